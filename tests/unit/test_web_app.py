"""`web.App`: Flask with each view's and hook's `async def` check made once per function."""

from __future__ import annotations

from typing import Any

from web import App


class _Unhashable:
    """A view object that defines equality and so has no hash."""

    __hash__ = None  # type: ignore[assignment]

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Unhashable)

    def __call__(self) -> str:
        return "unhashable view"


def test_views_and_hooks_run_and_each_is_checked_once() -> None:
    app = App(__name__)
    calls: list[str] = []

    @app.before_request
    def _hook() -> None:
        calls.append("hook")

    @app.get("/plain")
    def plain() -> str:
        return "plain view"

    app.add_url_rule("/odd", "odd", _Unhashable())
    client = app.test_client()
    for _ in range(3):
        assert client.get("/plain").get_data(as_text=True) == "plain view"
        assert client.get("/odd").get_data(as_text=True) == "unhashable view"
    assert calls == ["hook"] * 6
    cached: dict[Any, Any] = app._sync
    assert cached[plain] is plain and cached[_hook] is _hook  # remembered, returned as they are
    assert len(cached) == 2  # the unhashable view is checked each time, never stored
