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


# Frames compressed lately, shared by every link of the process: the links of one
# database send the same frame to each peer after a commit, and each frame is compressed
# on its own (no state carries over between frames), so equal bytes compress to equal
# bytes. A hit costs a comparison of the two frames instead of compressing again. Only
# frames up to CACHE_MAX bytes are kept, so the cache stays small.
RECENT = 4
CACHE_MAX = 1 << 20


class _Recent:
    """The last ``RECENT`` (level, frame, compressed or None) of every link."""

    def __init__(self) -> None:
        self.frames: list[tuple[int, bytes, bytes | None]] = []

    def get(self, level: int, data: bytes) -> tuple[bool, bytes | None]:
        for kept_level, frame, packed in self.frames:
            if frame == data and kept_level == level:
                return True, packed
        return False, None

    def put(self, level: int, data: bytes, packed: bytes | None) -> None:
        if len(data) <= CACHE_MAX:
            self.frames = [(level, data, packed), *self.frames[:RECENT - 1]]


_recent = _Recent()


class FrameCompressor:
    """One link's compressor and decompressor (zstd objects are not thread-safe)."""

    def __init__(self, level: int = 1) -> None:
        self._level = level
        self._compressor = zstandard.ZstdCompressor(level=level, write_content_size=True)
        self._decompressor = zstandard.ZstdDecompressor()

    def shrink(self, data: bytes) -> bytes | None:
        """``data`` compressed, or None when it is too small or does not pay."""
        if len(data) < MIN_SIZE:
            return None
        found, packed = _recent.get(self._level, data)
        if not found:
            packed = self._compressor.compress(data)
            if len(packed) > len(data) * MAX_RATIO:
                packed = None
            _recent.put(self._level, data, packed)
        return packed

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
