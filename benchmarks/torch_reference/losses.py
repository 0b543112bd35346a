"""The reference steps' losses in PyTorch, written as the official loops compute them (`jaxpurify.losses` holds the
JAX ports; tests/unit/bench_torch_test.py checks that both agree). Feature maps are NCHW."""

import torch
from torch.nn import functional as F


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> torch.Tensor:
  """SimCLR's NT-Xent as BadEncoder's `pretraining_encoder.py` (from leftthomas/SimCLR) writes it: z1, z2 [B, P]
  projections of two views (L2-normalised here) -> mean over the 2B anchors of −log(exp(pos / τ) / Σ_{k ≠ self}
  exp(s_k / τ)), a scalar."""
  out = F.normalize(torch.cat([z1, z2]), dim=-1)
  n = out.shape[0]
  sim = torch.exp(out @ out.t() / temperature)
  sim = sim.masked_select(~torch.eye(n, dtype=torch.bool, device=out.device)).view(n, n - 1)
  pos = torch.exp(torch.sum(out[:n // 2] * out[n // 2:], dim=-1) / temperature).repeat(2)
  return torch.mean(-torch.log(pos / sim.sum(dim=-1)))


def _attention_map(f: torch.Tensor, p: float, eps: float = 1e-6) -> torch.Tensor:
  """[B, C, H, W] -> [B, 1, H, W]: Σ_c |F|^p, divided per sample by its L2 norm over (H, W) + eps."""
  a = torch.sum(torch.abs(f) ** p, dim=1, keepdim=True)
  return a / (torch.norm(a, dim=(2, 3), keepdim=True) + eps)


def attention_transfer(f_student: torch.Tensor, f_teacher: torch.Tensor, p: float = 2) -> torch.Tensor:
  """NAD's AT(p) (the distillation code's `at.py`): MSE over (b, h, w) of the two normalised attention maps, a
  scalar; f_student [B, Cs, H, W], f_teacher [B, Ct, H, W] (no gradient into the teacher)."""
  return F.mse_loss(_attention_map(f_student, p), _attention_map(f_teacher.detach(), p))


def feature_clone(h_student: torch.Tensor, h_teacher: torch.Tensor) -> torch.Tensor:
  """The distillation code's clone term: −mean_b cos(h_s[b], h_t[b]) over final features [B, D], a scalar."""
  return -torch.mean(torch.sum(F.normalize(h_student, dim=-1) * F.normalize(h_teacher.detach(), dim=-1), dim=-1))


def _cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
  """Mean over rows of the cosine similarity of a and b [..., D]."""
  return torch.mean(torch.sum(F.normalize(a, dim=-1) * F.normalize(b, dim=-1), dim=-1))


def badencoder_loss(f_triggered, f_shadow, c_shadow, f_ref, f_ref_aug, c_ref, lambda1: float, lambda2: float):
  """BadEncoder's loss as `badencoder.py` computes it -> (L0 + λ1 L1 + λ2 L2, {'l0', 'l1', 'l2'}).

  f' (backdoored) features: f_triggered, f_shadow [B, D]; f_ref, f_ref_aug [R, B, D] (each reference repeated per
  shadow image, and B augmentations of it). Clean encoder's: c_shadow [B, D], c_ref [R, B, D].
  L0 = −mean_r cos(f'(x ⊕ e), f'(ref_r)), L1 = −mean_r cos(f'(aug(ref_r)), f(ref_r)), L2 = −cos(f'(x), f(x)).
  """
  refs = range(f_ref.shape[0])
  terms = {"l0": -sum(_cosine(f_triggered, f_ref[r]) for r in refs) / len(refs),
           "l1": -sum(_cosine(f_ref_aug[r], c_ref[r]) for r in refs) / len(refs),
           "l2": -_cosine(f_shadow, c_shadow)}
  return terms["l0"] + lambda1 * terms["l1"] + lambda2 * terms["l2"], terms
