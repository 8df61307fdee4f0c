"""One ``with`` / ``async with`` protocol for everything that is closed when a block ends."""

from __future__ import annotations

from types import TracebackType
from typing import Self


class Closing:
    """``with`` calls :meth:`close`, ``async with`` awaits :meth:`close_async`.

    Subclasses define ``close``; ``close_async`` defaults to it for what has nothing to await.
    """

    def close(self) -> None:
        raise NotImplementedError

    async def close_async(self) -> None:
        self.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close_async()
