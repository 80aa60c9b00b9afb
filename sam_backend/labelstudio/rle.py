"""Label Studio layer: brush RLE, HxW mask <-> the bit-packed ``@thi.ng/rle-pack`` byte list.

Label Studio decodes ``value.rle`` of a ``brushlabels`` region into a row-major RGBA image of the
image's natural size; a pixel is on where alpha != 0. The stream (the format of @thi.ng/rle-pack):

* header: 32-bit value count (H*W*4), 5-bit word size - 1 (7, i.e. 8-bit words), four 4-bit
  run-size classes - 1 (classes 3, 4, 8, 16 bits);
* records: 1 repeat bit, 2-bit size class, run length - 1 in that class's number of bits, then one
  8-bit value (repeat record) or that many 8-bit values (literal record);
* zero padding to whole bytes.

:func:`mask_to_rle` reproduces ``label_studio_converter.brush.mask2rle(mask.astype(np.uint8) * 255)``
byte for byte, including that encoder's quirks:

* a run of one value is written as a literal record ``0 00 000 <value>``;
* runs of 2..8 / 9..16 / 17..256 values use classes 0 / 1 / 2; longer runs use class 3 (16 bits)
  and are split into records of 65536 values, the remainder (1..65536 values) in a last class-3
  record, even when that remainder would fit a smaller class;
* the padding is ``8 - nbits % 8`` zero bits, i.e. a whole zero byte when the stream already ends
  on a byte boundary.

The encoder is vectorised numpy: O(pixels) work to find pixel runs, then O(runs) work to build and
bit-pack the records; there is no Python loop per pixel or per run.
"""
from __future__ import annotations

import logging
from typing import Iterable, List, Sequence, Tuple

import numpy as np

logger = logging.getLogger(__name__)

__all__ = ["mask_to_rle", "rle_to_mask", "RLE_WORD_SIZE", "RLE_SIZES"]

#: bits per value, and the four run-length size classes (bits), as written by Label Studio's encoder
RLE_WORD_SIZE = 8
RLE_SIZES = (3, 4, 8, 16)
_CHANNELS = 4  # RGBA: every mask pixel becomes 4 equal values
_MAX_VALUES = 2**32 - 1  # the value count is a 32-bit header field
_LONG_RECORD = 2**16  # values per record when a long run is split (16-bit length field)
_HEADER_BITS = 32 + 5 + 4 * len(RLE_SIZES)  # 53
_CHUNK_RUNS = 1 << 18  # runs encoded per numpy pass: keeps temporaries small (cache, page faults)

# per size class: the record's bit length, and its leading bits (repeat flag = 1, class) already
# shifted into place above the length field and the 8-bit value
_REC_BITS = np.array([1 + 2 + size + RLE_WORD_SIZE for size in RLE_SIZES], dtype=np.uint8)
_REC_HEAD = np.array(
    [((4 | cls) << (size + RLE_WORD_SIZE)) for cls, size in enumerate(RLE_SIZES)], dtype=np.uint32
)


def _header_tail() -> int:
    """The header after the 32-bit count: word size - 1 (5 bits), the 4 size classes - 1 (4 bits each)."""
    code = RLE_WORD_SIZE - 1
    for size in RLE_SIZES:
        code = (code << 4) | (size - 1)
    return code


def _as_bool_mask(mask: np.ndarray) -> np.ndarray:
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"mask must be a 2-D (height, width) array, got shape {mask.shape}")
    if mask.size == 0:
        raise ValueError(f"mask must have at least one pixel, got shape {mask.shape}")
    if mask.dtype != np.bool_:
        mask = mask != 0
    return mask


def _records(vlen: np.ndarray, vals: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Records (codes uint32, bit lengths uint8) of runs of ``vlen`` (uint32, >= 2) values ``vals``.

    Mirrors ``label_studio_converter.brush.encode_rle``: class by run length (2..8, 9..16, 17..256,
    longer); a run longer than 256 values is written as records of 65536 values (length field
    65535) and a last class-3 record with the remainder (1..65536 values).
    """
    cls = (vlen > 8).view(np.uint8) + (vlen > 16).view(np.uint8) + (vlen > 256).view(np.uint8)
    field = vlen - np.uint32(1)  # length - 1
    long_runs = np.flatnonzero(vlen > _LONG_RECORD)
    if long_runs.size:
        per_run = np.ones(vlen.size, dtype=np.int64)
        per_run[long_runs] += (field[long_runs] >> 16).astype(np.int64)
        rec_run = np.repeat(np.arange(vlen.size), per_run)
        last = np.cumsum(per_run) - 1  # index of each run's last record
        field = np.full(rec_run.size, _LONG_RECORD - 1, dtype=np.uint32)
        field[last] = (vlen - np.uint32(1)) & np.uint32(_LONG_RECORD - 1)  # remainder - 1
        cls = cls[rec_run]
        vals = vals[rec_run]
    codes = _REC_HEAD[cls] | (field << np.uint32(RLE_WORD_SIZE)) | vals
    return codes, _REC_BITS[cls]


def _pack_into(words: np.ndarray, codes: np.ndarray, nbits: np.ndarray, bit0: int) -> int:
    """OR variable-length records into big-endian uint32 ``words``, starting at bit ``bit0``.

    ``codes`` (uint32) holds each record right-aligned, ``nbits`` its length (1..32 bits). Returns
    the bit position after the last record. Bits not covered by a record must be zero in ``words``.

    A record lands in the word holding its first bit; at most one record crosses each word
    boundary, spilling its low bits into the next word. Records never overlap, so OR-reducing the
    contiguous group of records that starts in one word assembles that word.
    """
    ends = np.cumsum(nbits, dtype=np.int64)
    ends += bit0
    starts = ends - nbits
    word = starts >> 5
    # free bits after the record in its first word (< 0: that many bits spill into the next word)
    room = 32 - (starts & 31) - nbits
    head = (codes << np.maximum(room, 0).astype(np.uint32)) >> np.maximum(-room, 0).astype(np.uint32)
    group = np.flatnonzero(word[1:] != word[:-1])
    group += 1
    group = np.concatenate(([0], group))
    words[word[group]] |= np.bitwise_or.reduceat(head, group)
    spill = np.flatnonzero(room < 0)
    if spill.size:
        # the low bits go to the top of the next word; the uint32 shift drops the bits written above
        words[word[spill] + 1] |= codes[spill] << (32 + room[spill]).astype(np.uint32)
    return int(ends[-1])


def mask_to_rle(mask: np.ndarray) -> List[int]:
    """Encode an HxW mask as a Label Studio brush RLE (list of Python ints 0..255).

    ``mask``: (H, W) array, bool or numeric; a pixel is on where it is non-zero (so bool, 0/1 and
    0/255 masks all work). Row-major, image frame (row = y, column = x), the image's natural size.
    On pixels are written as RGBA (255, 255, 255, 255), off pixels as (0, 0, 0, 0).

    Byte-for-byte equal to ``label_studio_converter.brush.mask2rle(m.astype(np.uint8) * 255)`` for
    ``m = mask != 0``. O(pixels) numpy work to find the pixel runs, then O(runs) to write them, in
    chunks of runs; no Python loop per pixel or per run.
    """
    mask = _as_bool_mask(mask)
    height, width = mask.shape
    num_values = height * width * _CHANNELS
    if num_values > _MAX_VALUES:
        raise ValueError(
            f"mask of {height}x{width} pixels is too large for a brush RLE "
            f"({num_values} values do not fit the 32-bit count)"
        )
    pixels = mask.ravel()  # row-major; copies only non-contiguous views
    n = pixels.size
    # run r covers pixels [bounds[r], bounds[r + 1]); bounds = 0, change..., n
    change = np.flatnonzero(pixels[1:] != pixels[:-1])
    change += 1
    nruns = change.size + 1
    first_on = bool(pixels[0])

    # upper bound of the stream length: 27-bit records, one per run plus one per 65536 values
    max_bits = _HEADER_BITS + 27 * (nruns + num_values // _LONG_RECORD + 1)
    words = np.zeros(max_bits // 32 + 2, dtype=np.uint32)  # calloc: untouched pages cost nothing
    words[0] = num_values
    words[1] = _header_tail() << (64 - _HEADER_BITS)
    bit = _HEADER_BITS
    nrecords = 0
    for lo in range(0, nruns, _CHUNK_RUNS):
        hi = min(lo + _CHUNK_RUNS, nruns)
        bounds = np.empty(hi - lo + 1, dtype=np.int64)
        bounds[0] = change[lo - 1] if lo else 0
        inner = min(hi, nruns - 1)  # runs before the last one end at a change
        bounds[1:1 + inner - lo] = change[lo:inner]
        if hi == nruns:
            bounds[-1] = n
        vlen = np.diff(bounds).astype(np.uint32)
        vlen <<= np.uint32(2)  # values per run: 4 per pixel, so >= 4 and never a literal record
        # runs alternate on/off
        on = first_on ^ bool(lo & 1)
        vals = np.empty(hi - lo, dtype=np.uint32)
        vals[0::2] = 255 if on else 0
        vals[1::2] = 0 if on else 255
        codes, nbits = _records(vlen, vals)
        bit = _pack_into(words, codes, nbits, bit)
        nrecords += codes.size
    nbytes = bit // 8 + 1  # Label Studio pads with 8 - bits % 8 zero bits: 1..8
    out = words[: (nbytes + 3) // 4].astype(">u4").view(np.uint8)[:nbytes]
    logger.debug(
        "mask %dx%d: %d runs, %d records, %d RLE bytes", height, width, nruns, nrecords, nbytes
    )
    return out.tolist()


class _BitReader:
    """Big-endian bit reader over a byte buffer (reads up to 32 bits at a time)."""

    def __init__(self, data: bytes):
        self.data = data + b"\x00" * 8  # so that a read near the end never slices short
        self.nbits = len(data) * 8
        self.pos = 0

    def read(self, n: int) -> int:
        if self.pos + n > self.nbits:
            raise ValueError(
                f"brush RLE is truncated: needs {self.pos + n} bits, has {self.nbits}"
            )
        byte = self.pos >> 3
        chunk = int.from_bytes(self.data[byte:byte + 6], "big")  # 48 bits >= 7 + 32
        value = (chunk >> (48 - (self.pos & 7) - n)) & ((1 << n) - 1)
        self.pos += n
        return value


def _rle_bytes(rle: Iterable[int]) -> bytes:
    if isinstance(rle, (bytes, bytearray)):
        return bytes(rle)
    arr = np.asarray(rle)
    if arr.ndim != 1:
        raise ValueError(f"brush RLE must be a flat list of byte values, got shape {arr.shape}")
    if arr.size and (arr.dtype.kind not in "iu" or arr.min() < 0 or arr.max() > 255):
        raise ValueError("brush RLE must be a list of integers 0..255")
    return arr.astype(np.uint8).tobytes()


def rle_to_mask(rle: Sequence[int], height: int, width: int) -> np.ndarray:
    """Decode a Label Studio brush RLE into an (height, width) bool mask (alpha channel != 0).

    ``rle``: list of byte values 0..255 (or ``bytes``), as in ``value.rle`` of a brush region.
    ``height``, ``width``: the image's natural size, i.e. the region's ``original_height`` and
    ``original_width``. Accepts any word size and size classes the header declares, like Label
    Studio's decoder. Raises ValueError when the RLE is malformed or does not decode to exactly
    ``height * width * 4`` values.

    One Python step per record (run); the output is expanded with numpy.
    """
    if height <= 0 or width <= 0:
        raise ValueError(f"mask size must be positive, got {height}x{width}")
    reader = _BitReader(_rle_bytes(rle))
    expected = height * width * _CHANNELS
    num = reader.read(32)
    if num != expected:
        raise ValueError(
            f"brush RLE holds {num} values, but a {width}x{height} RGBA image needs {expected}"
        )
    word_size = reader.read(5) + 1
    sizes = [reader.read(4) + 1 for _ in range(4)]
    read = reader.read
    # the decoded stream as segments (is the value non-zero, how many values); only "non-zero"
    # matters for the mask, so the values themselves are not kept
    seg_on: List[bool] = []
    seg_len: List[int] = []
    i = 0
    while i < num:
        repeat = read(1)
        j = i + 1 + read(sizes[read(2)])
        if j > num:
            raise ValueError(
                f"brush RLE is corrupt: a run ends at value {j}, past the {num} values declared"
            )
        if repeat:
            seg_on.append(read(word_size) != 0)
            seg_len.append(j - i)
        else:
            seg_on.extend(read(word_size) != 0 for _ in range(j - i))
            seg_len.extend([1] * (j - i))
        i = j
    values = np.repeat(np.asarray(seg_on, dtype=bool), np.asarray(seg_len, dtype=np.int64))
    return values.reshape(height, width, _CHANNELS)[:, :, 3].copy()
