"""CorruptEncoder: reference-object + trigger images added to the pre-training set, an encoder pre-trained on it,
and it and the clean encoder evaluated with the trigger on downstream test images. The pipeline is SSL-Backdoor's
(`experiments/ssl_backdoor.py`) with config.attack.mode = corruptencoder. Stages: pretrain (unless
config.attack.clean_encoder), poison (poison/poisoned_pretrain.npz, poison/samples.png), pretrain_poisoned,
evaluate."""

from jaxpurify.experiments.ssl_backdoor import bench_step, check, plan, run

__all__ = ["bench_step", "check", "plan", "run"]
