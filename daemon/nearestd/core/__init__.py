"""The pure core: no asyncio, sockets, files, clocks, randomness or logging."""
