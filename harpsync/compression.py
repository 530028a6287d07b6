"""The only zstandard import: per-link compression of replication frames."""

from __future__ import annotations

import zstandard

NAME = "zstd"
# Frames smaller than this go uncompressed: a single small write is latency-bound, and
# zstd's frame header eats most of what it could save.
MIN_SIZE = 1024
# A compressed frame is sent only if it is at most this share of the original.
MAX_RATIO = 0.9
MAX_OUTPUT = 256 * 1024 * 1024  # a frame never inflates beyond this (bombs fail early)


class CompressionError(ValueError):
    """A compressed frame could not be inflated (corrupt, or larger than allowed)."""


class FrameCompressor:
    """One link's compressor and decompressor (zstd objects are not thread-safe)."""

    def __init__(self, level: int = 1) -> None:
        self._compressor = zstandard.ZstdCompressor(level=level, write_content_size=True)
        self._decompressor = zstandard.ZstdDecompressor()

    def shrink(self, data: bytes) -> bytes | None:
        """``data`` compressed, or None when it is too small or does not pay."""
        if len(data) < MIN_SIZE:
            return None
        packed = self._compressor.compress(data)
        return packed if len(packed) <= len(data) * MAX_RATIO else None

    def inflate(self, data: bytes | memoryview) -> bytes:
        """Inflate one compressed frame.

        Raises:
            CompressionError: if it is corrupt or would exceed ``MAX_OUTPUT``.
        """
        try:
            params = zstandard.get_frame_parameters(data)
            if params.content_size > MAX_OUTPUT:
                raise CompressionError(f"compressed frame inflates to {params.content_size} "
                                       f"bytes, over the {MAX_OUTPUT}-byte limit")
            return self._decompressor.decompress(data, max_output_size=MAX_OUTPUT)
        except zstandard.ZstdError as exc:
            raise CompressionError(f"undecodable compressed frame: {exc}") from None
