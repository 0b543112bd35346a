"""Knowledge-distillation losses between a student and a frozen teacher encoder.

Specified in distillation.md sections 6 and 7, and ported from the official code of the distillation defense
(`wssun/SSLBackdoorMitigation` `KDistill_ZOO/*` and `at.py`, itself `bboylyg/NAD`'s and AberHu's AT). Feature maps are
NHWC, [B, H, W, C]; PyTorch's channel axis 1 is the last axis here. Every teacher argument is wrapped in
`stop_gradient`. Batch axes may be row-sharded over a mesh axis: the two losses that pair rows of the batch
(`correlation_congruence`, `similarity_preserving`) gather them with `all_rows`; the others only reduce over rows.

Maps on two grids (a ResNet stage against a ViT block, distillation.md and docs/vit.md): `attention_transfer`
area-averages the finer of the two attention maps onto the coarser grid; the channel-wise losses take maps of one
shape, which `match_grids` (area pooling of the finer feature map) makes of two grids, one dividing the other.

AT's and AFD's spatial norms are torch's: their gradient is 0 where the norm is 0 (e.g. a dead channel), where a
plain jnp.sqrt's would be NaN.
"""

import math

import jax
import jax.numpy as jnp

from jaxpurify.losses.core import all_rows, l2_normalize


def _as_float(x: jax.Array) -> jax.Array:
  x = jnp.asarray(x)
  return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def _student_teacher(f_student, f_teacher):
  """-> both as floats, the teacher without gradient."""
  return _as_float(f_student), jax.lax.stop_gradient(_as_float(f_teacher))


def _check_shapes(name: str, ok: bool, need: str, f_student: jax.Array, f_teacher: jax.Array):
  """Raises ValueError (at trace time) unless `ok`: `name` needs `need`."""
  if not ok:
    raise ValueError(f"{name} needs {need}, got shapes {f_student.shape} and {f_teacher.shape}")


def _norm0(x: jax.Array, axis) -> jax.Array:
  """L2 norm over `axis` (keepdims) with gradient 0 where it is 0, as torch.norm."""
  squares = jnp.sum(jnp.square(x), axis=axis, keepdims=True)
  positive = squares > 0
  return jnp.where(positive, jnp.sqrt(jnp.where(positive, squares, 1.0)), 0.0)


def grids_match(shape_a: tuple[int, ...], shape_b: tuple[int, ...]) -> bool:
  """Whether two maps' grids (axes 1 and 2 of [B, H, W, ...]) can be brought together: each side of the coarser
  grid divides the finer one's."""
  return all(max(a, b) % min(a, b) == 0 for a, b in zip(shape_a[1:3], shape_b[1:3]))


def area_pool(x: jax.Array, grid: tuple[int, int]) -> jax.Array:
  """[B, H, W, ...] -> [B, h, w, ...]: the mean of each (H/h) x (W/w) block; h must divide H and w divide W. The
  input itself when it is already on `grid`. A strided window sum (not a reshape), so a batch sharded over a mesh
  with explicit axes keeps its sharding."""
  _, height, width, *rest = x.shape
  h, w = grid
  if (height, width) == (h, w):
    return x
  if height % h or width % w:
    raise ValueError(f"area_pool needs a grid dividing {(height, width)}, got {grid}")
  window = (1, height // h, width // w, *(1 for _ in rest))
  return jax.lax.reduce_window(x, 0.0, jax.lax.add, window, window, "VALID") / (window[1] * window[2])


def match_grids(f_student: jax.Array, f_teacher: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Both maps [B, H, W, ...] on the coarser of their grids, the finer one area-pooled (`area_pool`)."""
  grid = tuple(min(a, b) for a, b in zip(f_student.shape[1:3], f_teacher.shape[1:3]))
  return area_pool(f_student, grid), area_pool(f_teacher, grid)


def _attention_map(f: jax.Array, p: float) -> jax.Array:
  """[B, H, W, C] -> [B, H, W]: a = Σ_c |F|^p."""
  return jnp.sum(jnp.abs(f) ** p, axis=-1)


def _normalized(a: jax.Array, eps: float = 1e-6) -> jax.Array:
  """An attention map [B, H, W] divided per sample by (||a||₂ over (H, W) + eps)."""
  return a / (_norm0(a, axis=(1, 2)) + eps)


def attention_transfer(f_student: jax.Array, f_teacher: jax.Array, p: float = 2) -> jax.Array:
  """Attention transfer, NAD / AberHu form (`at.py` `AT(p)`), a scalar.

  f_student [B, H, W, Cs], f_teacher [B, H', W', Ct] (channel counts may differ; grids too, one dividing the
  other). a(F) = Σ_c |F_c|^p [B, H, W]; on two grids the finer a is area-averaged onto the coarser grid
  (`match_grids`); â = a / (||a||₂ over (H, W) + 1e-6), per sample; loss = mean over (b, h, w) of (â(Fs) − â(Ft))².
  Not RepDistiller's `Attention` (mean over c, flattened).
  """
  _check_shapes("attention_transfer", f_student.ndim == f_teacher.ndim == 4
                and f_student.shape[0] == f_teacher.shape[0] and grids_match(f_student.shape, f_teacher.shape),
                "maps [B, H, W, C] that agree on B, on grids one dividing the other", f_student, f_teacher)
  f_student, f_teacher = _student_teacher(f_student, f_teacher)
  a_student, a_teacher = match_grids(_attention_map(f_student, p), _attention_map(f_teacher, p))
  return jnp.mean(jnp.square(_normalized(a_student) - _normalized(a_teacher)))


def fitnet(f_student: jax.Array, f_teacher: jax.Array) -> jax.Array:
  """FitNet hint loss (`FitNet.py` `HintLoss`, torch's MSELoss), a scalar: mean over all elements of (Fs − Ft)².

  f_student, f_teacher: the same shape, e.g. [B, H, W, C].
  """
  _check_shapes("fitnet", f_student.shape == f_teacher.shape, "inputs of one shape", f_student, f_teacher)
  f_student, f_teacher = _student_teacher(f_student, f_teacher)
  return jnp.mean(jnp.square(f_student - f_teacher))


def correlation_congruence(f_student: jax.Array, f_teacher: jax.Array) -> jax.Array:
  """The official CC (`CC.py` `Correlation`, RepDistiller's), a scalar.

  f_student, f_teacher: the same shape [B, ..., C], e.g. [B, H, W, C] (or [B, D]); B >= 2.
  δ = |Fs − Ft|; loss = mean over (b, h, w) of Σ_c δ[b, h, w, c] δ[b + 1, h, w, c], b = 0..B−2, i.e. torch's
  `mean((δ[:-1] * δ[1:]).sum(1))` on NCHW: a mean over (B − 1)·H·W terms. It depends on the order of the batch.
  """
  _check_shapes("correlation_congruence", f_student.shape == f_teacher.shape and f_student.ndim >= 2
                and f_student.shape[0] >= 2, "inputs [B >= 2, ..., C] of one shape", f_student, f_teacher)
  f_student, f_teacher = _student_teacher(f_student, f_teacher)
  delta = all_rows(jnp.abs(f_student - f_teacher))
  return jnp.mean(jnp.sum(delta[:-1] * delta[1:], axis=-1))


def kd(f_student: jax.Array, f_teacher: jax.Array, temperature: float = 0.5) -> jax.Array:
  """Hinton KD over the channel axis (`KD.py` `DistillKL(T)`, KLDivLoss 'batchmean'), a scalar.

  f_student, f_teacher: the same shape [B, ..., C], e.g. [B, H, W, C] (or [B, C] logits).
  loss = T² · (1/B) · Σ_{b,h,w} KL(softmax_c(Ft/T) ‖ softmax_c(Fs/T)), the softmax over the last axis at every
  position; 'batchmean' divides the total by B only.
  """
  _check_shapes("kd", f_student.shape == f_teacher.shape and f_student.ndim >= 2, "inputs [B, ..., C] of one shape",
                f_student, f_teacher)
  f_student, f_teacher = _student_teacher(f_student, f_teacher)
  log_p_s = jax.nn.log_softmax(f_student / temperature, axis=-1)
  log_p_t = jax.nn.log_softmax(f_teacher / temperature, axis=-1)
  return temperature**2 * jnp.sum(jnp.exp(log_p_t) * (log_p_t - log_p_s)) / f_student.shape[0]


def similarity_preserving(f_student: jax.Array, f_teacher: jax.Array) -> jax.Array:
  """Similarity-preserving KD (Tung & Mori; `SP.py` `Similarity`), a scalar. Unused by the official `SP` switch.

  f_student [B, ...], f_teacher [B, ...]: only B must agree (e.g. [B, H, W, Cs] and [B, H', W', Ct]).
  G = F Fᵀ [B, B] with F flattened per sample, each row L2-normalised (torch's F.normalize, eps 1e-12);
  loss = ||G_s − G_t||_F² / B².
  """
  _check_shapes("similarity_preserving", f_student.ndim >= 1 and f_teacher.ndim >= 1
                and f_student.shape[0] == f_teacher.shape[0], "inputs [B, ...] with the same B", f_student, f_teacher)
  f_student, f_teacher = _student_teacher(f_student, f_teacher)
  batch = f_student.shape[0]

  def gram(f):
    f = f.reshape(batch, -1)
    return l2_normalize(f @ all_rows(f).T)

  return jnp.sum(jnp.square(gram(f_student) - gram(f_teacher))) / batch**2


def _se_weights(key: jax.Array, channels: int) -> tuple[jax.Array, jax.Array]:
  """The two 1×1 convs of AFD's SE block as matrices [C, 2C] and [2C, C], Kaiming normal (fan_out, ReLU gain).

  For a 1×1 conv C_in → C_out, fan_out = C_out, so std = sqrt(2 / C_out).
  """
  key_1, key_2 = jax.random.split(key)
  w_1 = jax.random.normal(key_1, (channels, 2 * channels)) * math.sqrt(2 / (2 * channels))
  w_2 = jax.random.normal(key_2, (2 * channels, channels)) * math.sqrt(2 / channels)
  return w_1, w_2


def afd(f_student: jax.Array, f_teacher: jax.Array, key: jax.Array) -> jax.Array:
  """Attentive feature distillation as in the official code (`AFD.py` `AFD(C)`), a scalar.

  f_student, f_teacher: the same shape [B, H, W, C]. key: draws the SE block; the official code re-creates it with a
  fresh random init every epoch and never trains it, so pass a key folded with the epoch.
  ρ = sigmoid(SE(GAP(Ft))) [B, C], renormalised to sum to 1 over c, with SE = 1×1 conv C → 2C, ReLU, 1×1 conv
  2C → C (`_se_weights`; its biases are zero and left out); F̂ = each channel map / (||F_c||₂ over (H, W) + 1e-6);
  loss = mean_b Σ_c ρ[b, c] · mean_{h,w} (F̂s − F̂t)². ρ depends on the teacher only, so it has no gradient.
  """
  _check_shapes("afd", f_student.ndim == 4 and f_student.shape == f_teacher.shape,
                "student and teacher maps [B, H, W, C] of one shape (the same C)", f_student, f_teacher)
  f_student, f_teacher = _student_teacher(f_student, f_teacher)
  w_1, w_2 = _se_weights(key, f_teacher.shape[-1])
  rho = jax.nn.sigmoid(jax.nn.relu(jnp.mean(f_teacher, axis=(1, 2)) @ w_1) @ w_2)
  rho = rho / jnp.sum(rho, axis=-1, keepdims=True)

  def channel_normalize(f):
    return f / (_norm0(f, axis=(1, 2)) + 1e-6)

  per_channel = jnp.mean(jnp.square(channel_normalize(f_student) - channel_normalize(f_teacher)), axis=(1, 2))
  return jnp.mean(jnp.sum(rho * per_channel, axis=-1))


def feature_clone(h_student: jax.Array, h_teacher: jax.Array) -> jax.Array:
  """The clone term (`distillation.py`'s `atloss`; the official `SP` switch), a scalar.

  h_student, h_teacher: [B, D] final backbone features. loss = −mean_b <ĥs[b], ĥt[b]>, ĥ = h / ||h||₂ (negative
  cosine similarity; the official features are already L2-normalised, so normalising again changes nothing).
  """
  _check_shapes("feature_clone", h_student.ndim == 2 and h_student.shape == h_teacher.shape,
                "features [B, D] of one shape", h_student, h_teacher)
  h_student, h_teacher = _student_teacher(h_student, h_teacher)
  return -jnp.mean(jnp.sum(l2_normalize(h_student) * l2_normalize(h_teacher), axis=-1))
