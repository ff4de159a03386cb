FROM python:3.11-slim
WORKDIR /srv/livegate
COPY pyproject.toml README.md ./
COPY app ./app
COPY static ./static
RUN pip install --no-cache-dir .
ENV ENVIRONMENT=production \
    DATABASE_URL=sqlite:////data/livegate.db \
    LIVEGATE_DATA_DIR=/data
VOLUME ["/data"]
EXPOSE 8000
# JWT_SECRET must be provided at run time in production.
CMD ["python", "-m", "app", "serve", "--host", "0.0.0.0", "--port", "8000"]
