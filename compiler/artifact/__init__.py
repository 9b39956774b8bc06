"""The packed weights file of a compressc artifact: records in, exact bytes out, a torch-only reader.

``write_weights`` / ``predict_size`` / ``read_weights`` live in ``container``; ``reader`` is the
standalone decoder whose source generated ``model.py`` files embed (``reader_source()``); ``bitpack``
and ``sparse`` are the sub-byte and position encodings. Format: docs/artifact.md.

>>> import numpy as np
>>> rec = TensorRecord("bias", (3,), "float32", values=np.array([1, 2, 3], np.float32))
>>> predict_size([rec]) == len(encode_weights([rec])), predict_size([rec]) < 40
(True, True)
>>> "import numpy" in reader_source()
False
"""

from __future__ import annotations

from pathlib import Path

from .bitpack import pack_bits, packed_nbytes, unpack_bits
from .container import (
    KINDS,
    SizeBreakdown,
    TensorRecord,
    dequantize_record,
    encode_weights,
    predict_size,
    read_weights,
    size_breakdown,
    validate_record,
    write_weights,
)
from .reader import QuantizedWeight, load_weights
from .sparse import PositionEncoding, choose_encoding

__all__ = [
    "TensorRecord",
    "SizeBreakdown",
    "KINDS",
    "write_weights",
    "encode_weights",
    "predict_size",
    "size_breakdown",
    "read_weights",
    "dequantize_record",
    "validate_record",
    "load_weights",
    "QuantizedWeight",
    "reader_source",
    "pack_bits",
    "unpack_bits",
    "packed_nbytes",
    "PositionEncoding",
    "choose_encoding",
]


def reader_source() -> str:
    """The source text of ``compressc.artifact.reader``, to paste verbatim into a generated model.py.

    It defines ``load_weights``, ``QuantizedWeight``, ``WEIGHTS_MAGIC``, ``WEIGHTS_VERSION`` and private
    helpers prefixed ``_``, and imports only ``os``, ``typing`` and ``torch``.

    >>> "def load_weights(" in reader_source()
    True
    """
    return (Path(__file__).parent / "reader.py").read_text(encoding="utf-8")
