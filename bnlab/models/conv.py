"""2-D convolution and max pooling in forms that compile well on every backend.

On XLA:CPU, ``lax.conv_general_dilated`` is fast in a jitted step but its
backward convolutions become very slow inside a ``lax.scan``/``while`` body
(see :func:`resolve_conv_implementation`). ``"xla_canonical"`` keeps the lax
forward and writes the backward pass as canonical NHWC convolutions;
``"gemm"`` runs forward and backward as row-major matrix products;
``"im2col"``/``"taps"`` write the convolution as shifted slices + matmuls, so
forward and backward passes are plain matmuls, slices and pads everywhere.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn
from jax import lax

Array = jax.Array
Padding = str | Sequence[tuple[int, int]]

IMPLEMENTATIONS = ("xla", "xla_canonical", "gemm", "im2col", "taps")
_NHWC = ("NHWC", "HWIO", "NHWC")


def resolve_conv_implementation(name: str = "auto") -> str:
  """Returns the concrete convolution implementation that ``name`` stands for.

  Concrete names are returned unchanged. ``"auto"`` resolves by
  ``jax.default_backend()``:

  * ``cpu`` -> ``"gemm"``. XLA:CPU canonicalizes convolutions to NHWC x HWIO
    -> NHWC (its fast YNNPACK/Eigen kernels) only in the entry computation;
    inside a ``lax.scan``/``while`` body the backward convolutions autodiff
    produces (dim_labels ``f01b_i01o->01bf``, ``b01f_01oi->b01f``) go to the
    slow generic loop emitter, so ``"xla"`` is ~8x slower in a scanned epoch.
    Its forward convolution also ran at ~90 GFLOP/s where a matmul of the
    same work ran at ~180. Measured with ``experiments/conv_speed.py`` (seed
    CNN train step in a scanned epoch, idle 2-core AVX2 CPU, jaxlib 0.10.2,
    forms interleaved), examples/s at batch 32 / 128: ``"gemm"`` 4,194 /
    3,909, ``"xla_canonical"`` 3,313 / 3,004 (``"xla"`` ~440 / ~330 in an
    earlier run). Its one limit: no forward-mode autodiff (``jax.jvp``); use
    ``"im2col"`` (every transform) or ``"xla"`` for that.
  * ``gpu``/``tpu`` and anything else -> ``"xla"`` (cuDNN / the TPU
    convolution emitters handle every layout, in and out of loops).
  """
  if name == "auto":
    return "gemm" if jax.default_backend() == "cpu" else "xla"
  if name not in IMPLEMENTATIONS:
    raise ValueError(
        f"Unknown convolution implementation {name!r}; expected 'auto' or one "
        f"of {IMPLEMENTATIONS}."
    )
  return name


def _explicit_padding(
    padding: Padding, in_shape: Sequence[int], kernel_shape: Sequence[int],
    strides: Sequence[int] | None = None,
) -> list[tuple[int, int]]:
  """(low, high) padding per spatial dim, as ``lax`` computes it (stride 1 by default)."""
  strides = strides or (1,) * len(kernel_shape)
  if isinstance(padding, str):
    mode = padding.upper()
    if mode == "VALID":
      return [(0, 0)] * len(kernel_shape)
    if mode == "SAME":
      # lax.padtype_to_pads: ceil(n/s) outputs, total pad (out-1)*s + k - n (k-1 at
      # stride 1), the extra one goes high.
      totals = [max((-(-n // s) - 1) * s + k - n, 0)
                for n, k, s in zip(in_shape, kernel_shape, strides)]
      return [(t // 2, t - t // 2) for t in totals]
    raise ValueError(f"Unsupported padding {padding!r}; use 'VALID', 'SAME' "
                     "or (low, high) pairs.")
  pads = [tuple(p) for p in padding]
  if len(pads) != len(kernel_shape):
    raise ValueError(f"padding {padding!r} needs {len(kernel_shape)} pairs.")
  return pads  # type: ignore[return-value]


def _shifted_windows(x: Array, kh: int, kw: int,
                     strides: tuple[int, int] = (1, 1)) -> tuple[list[Array], int, int]:
  """The kh*kw shifted (strided) views of padded NHWC ``x``, in (i, j) order."""
  sh, sw = strides
  if x.shape[1] < kh or x.shape[2] < kw:
    raise ValueError(f"Kernel {(kh, kw)} larger than padded input {x.shape}.")
  oh, ow = (x.shape[1] - kh) // sh + 1, (x.shape[2] - kw) // sw + 1
  views = [
      lax.slice(x, (0, i, j, 0), (x.shape[0], i + (oh - 1) * sh + 1,
                                  j + (ow - 1) * sw + 1, x.shape[3]), (1, sh, sw, 1))
      for i in range(kh)
      for j in range(kw)
  ]
  return views, oh, ow


def _lax_conv(x, kernel, pads, precision, strides=(1, 1)):
  return lax.conv_general_dilated(x, kernel, strides, pads,
                                  dimension_numbers=_NHWC, precision=precision)


@partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _conv_canonical_vjp(x, kernel, pads, precision):
  return _lax_conv(x, kernel, pads, precision)


def _conv_canonical_fwd(x, kernel, pads, precision):
  return _lax_conv(x, kernel, pads, precision), (x, kernel)


def _conv_canonical_bwd(pads, precision, residuals, g):
  """Both gradients as NHWC x HWIO -> NHWC convolutions plus transposes."""
  x, kernel = residuals
  kh, kw = kernel.shape[:2]
  (lo_h, hi_h), (lo_w, hi_w) = pads
  x_padded = jnp.pad(x, [(0, 0), (lo_h, hi_h), (lo_w, hi_w), (0, 0)])
  # Kernel gradient: Cin acts as the batch, N as the contracted feature dim.
  d_kernel = _lax_conv(jnp.transpose(x_padded, (3, 1, 2, 0)),   # (Cin,H,W,N)
                       jnp.transpose(g, (1, 2, 0, 3)),          # (OH,OW,N,Co)
                       ((0, 0), (0, 0)), precision)             # (Cin,KH,KW,Co)
  d_kernel = jnp.transpose(d_kernel, (1, 2, 0, 3)).astype(kernel.dtype)
  # Input gradient: full convolution with the flipped, in/out-swapped kernel.
  flipped = jnp.transpose(kernel[::-1, ::-1], (0, 1, 3, 2))
  d_x = _lax_conv(g, flipped, ((kh - 1, kh - 1), (kw - 1, kw - 1)), precision)
  d_x = d_x[:, lo_h:d_x.shape[1] - hi_h, lo_w:d_x.shape[2] - hi_w, :]
  return d_x.astype(x.dtype), d_kernel


_conv_canonical_vjp.defvjp(_conv_canonical_fwd, _conv_canonical_bwd)


def _patches(x: Array, kh: int, kw: int, strides: tuple[int, int] = (1, 1)) -> Array:
  """(N, OH, OW, KH*KW*C) im2col patches of padded NHWC ``x``, channels (i, j, c)."""
  views, _, _ = _shifted_windows(x, kh, kw, strides)
  return views[0] if len(views) == 1 else lax.concatenate(views, 3)


def _im2col_matmul(x, kernel, precision, strides=(1, 1)):
  kh, kw, cin, cout = kernel.shape
  return lax.dot_general(_patches(x, kh, kw, strides), kernel.reshape(kh * kw * cin, cout),
                         (((3,), (0,)), ((), ())), precision=precision)


@partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _conv_gemm(x, kernel, precision, strides):
  return _im2col_matmul(x, kernel, precision, strides)


def _conv_gemm_fwd(x, kernel, precision, strides):
  return _im2col_matmul(x, kernel, precision, strides), (x, kernel)


def _conv_gemm_bwd(precision, strides, residuals, g):
  """Both gradients as row-major GEMMs; the patches are rebuilt, not stored."""
  x, kernel = residuals
  kh, kw, cin, cout = kernel.shape
  k = kh * kw * cin
  sh, sw = strides
  (_, h, w, _), (_, oh, ow, _) = x.shape, g.shape
  rows = _patches(x, kh, kw, strides).reshape(-1, k)
  d_kernel = lax.dot_general(rows, g.reshape(-1, cout), (((0,), (0,)), ((), ())),
                             precision=precision).reshape(kernel.shape)
  d_patches = lax.dot_general(g, kernel.reshape(k, cout), (((3,), (1,)), ((), ())),
                              precision=precision)
  # col2im: window (i, j) of output pixel (a, b) goes back to input pixel
  # (i + a*sh, j + b*sw): low padding i, sh-1 zeros between, the rest high (kh-1-i at
  # stride 1; a strided conv's rows past its last window get none).
  d_x = None
  for t in range(kh * kw):
    i, j = divmod(t, kw)
    part = lax.pad(d_patches[..., t * cin:(t + 1) * cin], jnp.zeros((), g.dtype),
                   ((0, 0, 0), (i, h - i - (oh - 1) * sh - 1, sh - 1),
                    (j, w - j - (ow - 1) * sw - 1, sw - 1), (0, 0, 0)))
    d_x = part if d_x is None else d_x + part
  return d_x.astype(x.dtype), d_kernel.astype(kernel.dtype)


_conv_gemm.defvjp(_conv_gemm_fwd, _conv_gemm_bwd)


def conv2d(
    x: Array,
    kernel: Array,
    *,
    strides: int | Sequence[int] = 1,
    padding: Padding = "VALID",
    implementation: str = "auto",
    precision: Any = None,
) -> Array:
  """2-D convolution of NHWC ``x`` with an HWIO ``kernel``.

  Args:
    x: input, shape (N, H, W, Cin).
    kernel: shape (KH, KW, Cin, Cout), any (odd or even) kernel size.
    strides: int or (SH, SW) window strides (a ResNet's downsampling convs use 2).
      ``"gemm"``, ``"im2col"`` and ``"taps"`` take strided windows (no extra work);
      ``"xla_canonical"``, whose backward pass is written for stride 1, computes the
      stride-1 output and keeps every SH-th row and SW-th column (SH*SW times the work).
    padding: ``"VALID"``, ``"SAME"`` (as ``lax``: ceil(H/SH) outputs, extra pad goes
      high) or a pair of (low, high) ints per spatial dim.
    implementation: ``"xla"`` (``lax.conv_general_dilated``),
      ``"xla_canonical"`` (the same forward, with a ``custom_vjp`` whose
      backward convolutions are already NHWC x HWIO -> NHWC, the form XLA:CPU
      runs on its fast kernels also inside loop bodies; reverse mode only,
      no ``jax.jvp``; explicit padding must be non-negative), ``"gemm"``
      (im2col forward, and a ``custom_vjp`` whose backward is two row-major
      GEMMs, kernel gradient = patches^T g and window gradients = g W^T,
      folded back by col2im; reverse mode only), ``"im2col"``
      (concatenate the KH*KW shifted windows along channels, then one matmul
      with the kernel reshaped to (KH*KW*Cin, Cout)), ``"taps"`` (sum of KH*KW
      matmuls, one per shifted window, no concatenated patch tensor) or
      ``"auto"`` (see :func:`resolve_conv_implementation`).
    precision: passed to the ``lax`` convolution / dot.

  Returns:
    (N, OH, OW, Cout). All implementations are equal up to float rounding,
    forward and in gradients.
  """
  impl = resolve_conv_implementation(implementation)
  if x.ndim != 4 or kernel.ndim != 4:
    raise ValueError(f"Expected NHWC input and HWIO kernel, got {x.shape}, "
                     f"{kernel.shape}.")
  kh, kw, cin, cout = kernel.shape
  if x.shape[3] != cin:
    raise ValueError(f"Input has {x.shape[3]} channels, kernel expects {cin}.")
  strides = (strides, strides) if isinstance(strides, int) else tuple(strides)
  if len(strides) != 2 or not all(isinstance(s, int) and s >= 1 for s in strides):
    raise ValueError(f"strides must be a positive int or two of them, got {strides}.")
  pads = _explicit_padding(padding, x.shape[1:3], (kh, kw), strides)

  if impl == "xla":
    return _lax_conv(x, kernel, pads, precision, strides)
  if impl == "xla_canonical":
    if any(p < 0 for pair in pads for p in pair):
      raise ValueError(f"xla_canonical needs non-negative padding: {pads}.")
    y = _conv_canonical_vjp(x, kernel, tuple(map(tuple, pads)), precision)
    if strides == (1, 1):
      return y
    oh = (x.shape[1] + sum(pads[0]) - kh) // strides[0] + 1
    ow = (x.shape[2] + sum(pads[1]) - kw) // strides[1] + 1
    return y[:, :(oh - 1) * strides[0] + 1:strides[0], :(ow - 1) * strides[1] + 1:strides[1]]

  if any(p != (0, 0) for p in pads):
    x = jnp.pad(x, [(0, 0), *pads, (0, 0)])
  if impl == "gemm":
    return _conv_gemm(x, kernel, precision, strides)
  if impl == "im2col":
    # Channel order (i, j, c) matches the row-major reshape of the HWIO kernel.
    return _im2col_matmul(x, kernel, precision, strides)

  # impl == "taps"
  views, _, _ = _shifted_windows(x, kh, kw, strides)
  flat_kernel = kernel.reshape(kh * kw, cin, cout)
  out = None
  for t, view in enumerate(views):
    term = lax.dot_general(view, flat_kernel[t], (((3,), (0,)), ((), ())),
                           precision=precision)
    out = term if out is None else out + term
  return out


def max_pool(x: Array, window: int = 2) -> Array:
  """Non-overlapping ``window`` x ``window`` max pooling of NHWC ``x``.

  Stride = window, 'VALID': trailing rows/columns that do not fill a window
  are dropped, as ``flax.linen.max_pool(x, (w, w), (w, w))`` does. Written as
  crop + reshape + max, which XLA:CPU compiles to simple fused loops (forward
  and backward) instead of ``reduce_window`` / ``select_and_scatter``.

  Forward output equals ``nn.max_pool`` exactly, and so do gradients when each
  window has a unique maximum. On ties the two differ but both are valid
  subgradients with the same total per window: ``nn.max_pool`` gives the
  whole upstream gradient to one maximal element (the first in row-major
  window order), this function splits it evenly among all maximal elements
  (the JVP rule of ``lax.reduce_max``). After a ReLU, an all-zero window
  passes 1/4 of its gradient to each of its four zeros here, versus all of it
  to the first zero in ``nn.max_pool``; upstream those positions have zero
  ReLU derivative, so parameter gradients of a conv-relu-pool stack are
  identical either way.
  """
  if x.ndim != 4:
    raise ValueError(f"Expected NHWC input, got shape {x.shape}.")
  n, h, w, c = x.shape
  oh, ow = h // window, w // window
  if oh == 0 or ow == 0:
    raise ValueError(f"Window {window} larger than input {x.shape}.")
  if (oh * window, ow * window) != (h, w):
    x = x[:, : oh * window, : ow * window, :]
  return jnp.max(x.reshape(n, oh, window, ow, window, c), axis=(2, 4))


class Conv(nn.Module):
  """2-D convolution layer, a drop-in for ``flax.linen.Conv``.

  Same parameter names, shapes and default initializers as ``nn.Conv``
  (``kernel``: (KH, KW, Cin, Cout), ``bias``: (Cout,)), so variables and
  checkpoints interchange. Inputs are (..., H, W, Cin); leading batch dims
  are flattened. Note the default ``padding='VALID'`` (Keras' default, not
  flax's ``'SAME'``).

  Attributes:
    features: number of output channels.
    kernel_size: int or (KH, KW).
    strides: int or (SH, SW) (default 1).
    padding: ``'VALID'``, ``'SAME'`` or ((lo, hi), (lo, hi)).
    use_bias: add a learned bias.
    dtype: computation dtype (default: promoted from inputs and params).
    param_dtype: dtype of the parameters.
    precision: ``lax`` precision of the convolution / matmul.
    kernel_init: kernel initializer (flax's default, LeCun normal).
    bias_init: bias initializer (zeros).
    implementation: ``'auto'``, ``'xla'``, ``'xla_canonical'``, ``'im2col'``
      or ``'taps'``; see :func:`conv2d` and :func:`resolve_conv_implementation`.
  """

  features: int
  kernel_size: int | Sequence[int]
  strides: int | Sequence[int] = 1
  padding: Padding = "VALID"
  use_bias: bool = True
  dtype: Any = None
  param_dtype: Any = jnp.float32
  precision: Any = None
  kernel_init: Any = nn.initializers.lecun_normal()
  bias_init: Any = nn.initializers.zeros_init()
  implementation: str = "auto"

  @nn.compact
  def __call__(self, inputs: Array) -> Array:
    if isinstance(self.kernel_size, int):
      kernel_size = (self.kernel_size, self.kernel_size)
    else:
      kernel_size = tuple(self.kernel_size)
    if len(kernel_size) != 2:
      raise ValueError(f"Conv supports 2-D kernels only, got {kernel_size}.")
    if inputs.ndim < 3:
      raise ValueError(f"Expected (..., H, W, C) input, got {inputs.shape}.")

    batch_shape = inputs.shape[:-3]
    x = inputs.reshape((-1, *inputs.shape[-3:]))
    kernel = self.param(
        "kernel", self.kernel_init,
        (*kernel_size, inputs.shape[-1], self.features), self.param_dtype)
    bias = (self.param("bias", self.bias_init, (self.features,),
                       self.param_dtype) if self.use_bias else None)
    x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)

    y = conv2d(x, kernel, strides=self.strides, padding=self.padding,
               implementation=self.implementation, precision=self.precision)
    if bias is not None:
      y = y + bias
    return y.reshape((*batch_shape, *y.shape[1:]))
