"""Task code for the Kubernetes example: stands for your own modules."""

import wool


@wool.work
async def fibonacci(n: int) -> int:
    if n <= 1:
        return n
    return await fibonacci(n - 1) + await fibonacci(n - 2)


@wool.work
async def where() -> str:
    return wool.current_worker().address
