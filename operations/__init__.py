"""Operation handlers: each is ``async def handler(ctx, body) -> dict | list``."""
