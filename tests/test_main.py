"""The application factory: a server process of its own tunes its garbage collector,
an application embedded elsewhere (these tests) leaves the host's collector alone."""

from __future__ import annotations

import gc

from app.main import SERVER_GC_THRESHOLDS, create_app
from tests.conftest import Backend, make_settings
from tests.fake_upstream import FakeUpstream, LoopbackServer


async def run_app(backend: Backend, upstream: FakeUpstream, tune_gc: bool) -> tuple[object, int]:
    """The collector's thresholds and frozen count while the app is up."""
    server = LoopbackServer(create_app(make_settings(backend, upstream), tune_gc=tune_gc))
    await server.start()
    try:
        return gc.get_threshold(), gc.get_freeze_count()
    finally:
        await server.stop()


async def test_a_server_process_freezes_start_up_objects_and_collects_less_often(
    backend: Backend, fake_upstream: FakeUpstream
):
    before = gc.get_threshold()
    try:
        thresholds, frozen = await run_app(backend, fake_upstream, tune_gc=True)
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)
    assert thresholds == SERVER_GC_THRESHOLDS
    assert frozen > 0


async def test_an_embedded_app_leaves_the_collector_alone(
    backend: Backend, fake_upstream: FakeUpstream
):
    before = gc.get_threshold()
    thresholds, frozen = await run_app(backend, fake_upstream, tune_gc=False)
    assert (thresholds, frozen) == (before, 0)
