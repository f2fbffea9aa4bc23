"""kvc's own rANS: integer tables, lane bitstreams and the kernels that code them.

The bitstream is specified in docs/CODEC.md ("Byte layout of a kvq segment, versions 2 and 3"); in short:

* a *model* is an integer frequency table over an alphabet of ``A`` symbols summing to
  ``M = 2**PRECISION`` (``tables.quantize_frequencies`` is the one written-down rule that turns
  float64 weights into it, so any implementation rebuilds it bit for bit);
* a *lane* is an independent rANS stream (32-bit state, 16-bit words, ``L = 2**16``) that codes
  a run of channels, token after token; lanes start at offsets the segment gives, so every lane of
  every segment of a read can be decoded at the same time;
* an escape symbol (either end of a channel's alphabet) is followed by two raw 16-bit pieces of
  its excess, coded in the same stream, so a lane needs nothing outside itself.

Modules: ``tables`` (quantisation, cumulative and lookup tables), ``reference`` (a plain-Python
coder that is the executable spec, used by the tests), ``cpu`` (numba kernels, GIL released,
parallel over lanes), ``gpu`` (numba CUDA kernel, bit-exact with ``cpu``).
"""

PRECISION = 16  # probability bits: every table sums to 2**16
STATE_LOWER = 1 << 16  # L: the state lives in [L, 2**32)
LUT_SHIFT = 8  # the lookup table has one entry per 2**8 slots: 256 entries per model
LUT_SIZE = 1 << (PRECISION - LUT_SHIFT)
MAX_ALPHABET = 8193  # 2 * 4096 + 1: the largest radius kvq uses
MAX_EXCESS = 1 << 30  # escape excess cap (kvq symbols are clamped to ±2**30)

# Lane error codes (reported per lane by every decoder, turned into FormatError by the caller).
OK, EXHAUSTED, BAD_FINAL_STATE, BAD_EXCESS, BAD_START_STATE = 0, 1, 2, 3, 4
