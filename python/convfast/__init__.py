"""convfast: compiled N-D convolutions with PyTorch semantics, strided "same" padding, every padding
mode, channels_last, and a NumPy API.

>>> import numpy as np, convfast
>>> x = np.random.rand(1, 3, 32, 32).astype(np.float32)
>>> w = np.random.rand(8, 3, 3, 3).astype(np.float32)
>>> convfast.conv2d(x, w, stride=2, padding="same").shape
(1, 8, 16, 16)
"""
from . import _config  # noqa: F401  (first: it loads the OpenMP runtime with convfast's wait policy)
from . import reference  # noqa: F401  (pure NumPy oracle)
from ._config import (config, get_benchmark, get_isa, get_num_threads, set_benchmark, set_isa,  # noqa: F401
                      set_num_threads, show_config, supported_isas, _select_isa_from_environment, _version)
from .arithmetic import (ReceptiveField, conv_output_shape, conv_transpose_output_shape,  # noqa: F401
                         receptive_field, same_padding)
from .functional import (conv1d, conv2d, conv3d, conv_transpose1d, conv_transpose2d,  # noqa: F401
                         conv_transpose3d, pad)
from .layers import Conv1d, Conv2d, Conv3d, ConvTranspose1d, ConvTranspose2d, ConvTranspose3d  # noqa: F401
from .backward import (ConvGrads, conv1d_backward, conv2d_backward, conv3d_backward,  # noqa: F401
                       conv_transpose1d_backward, conv_transpose2d_backward, conv_transpose3d_backward,
                       pad_adjoint)

__version__ = _version()
_select_isa_from_environment()

__all__ = [
    "conv1d", "conv2d", "conv3d", "conv_transpose1d", "conv_transpose2d", "conv_transpose3d", "pad",
    "conv_output_shape", "conv_transpose_output_shape", "same_padding", "receptive_field", "ReceptiveField",
    "Conv1d", "Conv2d", "Conv3d", "ConvTranspose1d", "ConvTranspose2d", "ConvTranspose3d",
    "set_num_threads", "get_num_threads", "show_config", "config", "set_isa", "get_isa", "supported_isas",
    "set_benchmark", "get_benchmark",
    "reference", "__version__",
    "conv1d_backward", "conv2d_backward", "conv3d_backward", "conv_transpose1d_backward",
    "conv_transpose2d_backward", "conv_transpose3d_backward", "ConvGrads", "pad_adjoint",
]
