"""The mesh node: membership and gossip, the request lifecycle, the tile runtime, the
asyncio server that moves bytes between them."""
