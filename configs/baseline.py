"""Baseline defenses in the threat harness T-Core uses: dataset filters (SS, AC, SCAn, SPECTRE, STRIP, CT, ASSET),
poison-robust training (ABL) and model repair (FT, FP, NAD, ANP, I-BAU, CLP, RNP), against threats 1, 2 and 3
(docs/baselines.md).

  python main.py --config configs/baseline.py:defense=ss,threat=2,attack=badnets,quick
  python main.py --config configs/baseline.py:defense=scan,threat=3,attack=blended,encoder=badencoder,quick
  python main.py --config configs/baseline.py:defense=clp,threat=1,attack=ssl_backdoor,quick
  python -m jaxpurify.compare --config configs/tcore.py:threat=2,attack=badnets,quick --defenses tcore,ss,ac

defense = ss | ac | scan | spectre | strip | ct | asset | abl | ft | fp | nad | anp | ibau | clp | rnp | tcore (T-Core
on the same setting and victim set).
protocol = ft_all (default) | ft_head | both. The setting's stages (clean encoder, encoder attack, poisoned set,
undefended fine-tuning) have the names `configs/threat.py` and `configs/tcore.py` runs give them.

Without `threat`, an encoder attack (badencoder | drupe) names the encoder setting instead: the encoder-side
defenses on the distillation defense's setting (`encoder_setting`; configs/distill.py's stages):
  python main.py --config configs/baseline.py:defense=mimic,attack=badencoder,quick
  python -m jaxpurify.compare --config configs/distill.py:quick --settings attack=badencoder attack=drupe
"""

import math

import ml_collections

from configs import common
from configs import distill as distill_config
from configs import tcore as tcore_config


def get_config(arg=None):
  return common.build(arg, experiment, defense="ss", threat=0, attack="badnets", encoder="badencoder",
                      downstream="stl10", protocol="ft_all")


def experiment(defense: str, threat: int, attack: str, encoder: str, downstream: str, protocol: str,
               quick: bool) -> ml_collections.ConfigDict:
  """`defense` on the encoder setting (threat 0 with an encoder attack: `encoder_setting`) or against one threat
  (threat 0 with a dataset attack is threat 2)."""
  if threat == 0 and attack in distill_config.ATTACKS:
    return encoder_setting(defense, attack, downstream, quick)
  return threat_setting(defense, threat or 2, attack, encoder, downstream, protocol, quick)


def threat_setting(defense: str, threat: int, attack: str, encoder: str, downstream: str, protocol: str,
                   quick: bool) -> ml_collections.ConfigDict:
  """Baseline `defense` against one threat (the threat's setting and undefended rows, fine-tuned with `protocol`).

  The defender holds out `baseline.clean_fraction` of the downstream training set (per class, drawn with the seed)
  before the attacker poisons the rest; every cell trains on the rest, and only the methods that need clean
  labelled data (SCAn, STRIP, CT, ASSET and the model repair but CLP) read the reserve. No method sees the poison
  rate, the target or the poison positions: budgets and thresholds are the config's, pruning levels and stopping
  points are chosen on `held_out_fraction` of the reserve.

  Defaults (sources in docs/baselines.md): SS removes the top 15% of each class (BackdoorBench's percentile 85,
  every class scored); AC 10 components, 2-means, the smaller cluster flagged below 35% of its class
  (backdoor-toolbox); SCAn threshold e (backdoor-toolbox), EM 100 iterations; SPECTRE alpha 4, the top 15% of each
  class, k searched up to 32; STRIP alpha 1, 100 blends, threshold at the clean set's 10% entropy quantile
  (backdoor-toolbox); CT the official CIFAR-10 rounds with the reserve as confusion set and its likelihood-ratio
  test (threshold 2, 1.5 for the largest ratio); ASSET Adam 1e-4, a 2-layer MLP (hidden 128) fitted 100 steps per
  batch, outlyingness > 2, one epoch (reds-lab/ASSET demo); ABL flooding 0.5, isolation 1% after 20 epochs,
  unlearning 20 epochs at lr 5e-4 (BackdoorBench); FT 100 epochs on the reserve, batch 256, SGD 0.01 (momentum 0.9,
  weight decay 5e-4, cosine) from the undefended classifier (BackdoorBench); FP prune steps of 1% of the feature
  channels within a 10% relative held-out accuracy drop, then FT's fine-tuning (BackdoorBench); NAD a 10-epoch
  teacher, 20 student epochs, β 500/1000/1000 on layer2..4 (BackdoorBench); ANP eps 0.4, α 0.2, 2000 mask steps,
  mask lr 0.01 (BackdoorBench; the official 0.2 collapses masks learnt in inference mode), thresholds to 0.9;
  I-BAU 5 rounds, K 5, Adam 1e-3 (the official code); CLP u 3 (BackdoorBench); RNP 20% of the reserve, unlearning
  to 20% accuracy, mask recovery at lr 0.2 (BackdoorBench). quick: smaller budgets of steps (below).
  """
  c = tcore_config.experiment(threat, attack, encoder, downstream, protocol, quick)
  c.experiment = "baseline"
  c.baseline = ml_collections.ConfigDict(dict(
      defense=defense, clean_fraction=0.05, held_out_fraction=0.3,
      ss=dict(remove_fraction=0.15),
      ac=dict(dims=10, max_cluster_fraction=0.35),
      scan=dict(threshold=math.e, em_iters=100),
      spectre=dict(remove_fraction=0.15, que_alpha=4.0, max_dims=32),
      strip=dict(alpha=1.0, blends=100, clean_quantile=0.1, batch_size=512),
      ct=dict(ratios=(1 / 2, 1 / 5, 1 / 25, 1 / 50, 1 / 100), lambdas=(20.0, 20.0, 20.0, 30.0, 30.0),
              lrs=(1e-3, 1e-3, 1e-3, 1e-2, 1e-2), iters=(6000, 6000, 6000, 6000, 2000),
              pretrain_epochs=(10, 10, 10, 10, 10), pretrain_optim=common.optim("adam", 1e-4, 0.0),
              momentum=0.7, weight_decay=1e-4, batch_size=32, seed_batch_size=32, batch_factor=2, final_lambda=15.0,
              median_sample_fraction=0.1, lr_threshold=2.0, max_ratio_threshold=1.5, log_every=100),
      asset=dict(optim=common.optim("adam", 1e-4, 0.0), batch_size=512, base_batch_size=128, mlp_hidden=128,
                 inner_steps=100, epochs=1, outlyingness=2.0, threshold_eps=1e-6, min_marked=2, log_every=10),
      abl=dict(flooding=0.5, isolation_epochs=20, isolation_fraction=0.01, unlearn_epochs=20,
               unlearn_optim=common.optim("sgd", 5e-4, 1e-4, momentum=0.9), log_every=50),
      ft=dict(optim=common.optim("sgd", 0.01, 5e-4, momentum=0.9, schedule="cosine"), epochs=100, batch_size=256,
              log_every=50),
      fp=dict(prune_step=0.01, max_acc_drop=0.1, epochs=100, batch_size=256, log_every=50,
              optim=common.optim("sgd", 0.01, 5e-4, momentum=0.9, schedule="cosine")),
      nad=dict(teacher_epochs=10, epochs=20, taps=("layer2", "layer3", "layer4"), betas=(500.0, 1000.0, 1000.0),
               power=2.0, optim=common.optim("sgd", 0.01, 5e-4, momentum=0.9), batch_size=64, log_every=50),
      anp=dict(eps=0.4, pgd_steps=1, alpha=0.2, mask_lr=0.01, iters=2000, batch_size=128, threshold_step=0.05,
               max_threshold=0.9, max_acc_drop=0.1, log_every=100),
      ibau=dict(optim=common.optim("adam", 1e-3, 0.0), rounds=5, fixed_point_iters=5, inner_lr=10.0,
                fixed_point_lr=0.1, delta_penalty=1e-3, perturbed_fraction=0.01, batch_size=100, log_every=50),
      clp=dict(u=3.0, std_ddof=1, bn_eps=0.0),
      rnp=dict(fraction=0.2, unlearn_optim=common.optim("sgd", 0.01, 5e-4, momentum=0.9), unlearn_epochs=20,
               clean_threshold=0.2, recover_lr=0.2, recover_epochs=20, alpha=0.2, threshold_step=0.05,
               max_threshold=0.9, max_acc_drop=0.1, batch_size=128, log_every=50)))
  if quick:
    b = c.baseline
    b.strip.update(blends=32, batch_size=256)
    b.ct.update(ratios=(1 / 2, 1 / 5), lambdas=(20.0, 20.0), lrs=(1e-3, 1e-3), iters=(150, 150),
                pretrain_epochs=(5, 5), pretrain_optim=common.optim("adam", 1e-3, 0.0), log_every=25)
    b.asset.update(batch_size=64, base_batch_size=32, inner_steps=20)
    b.abl.update(isolation_epochs=5, unlearn_epochs=5, log_every=20)
    b.ft.update(batch_size=64, log_every=20)
    b.fp.update(batch_size=64, log_every=20)
    # the quick reserve (70 images) is one batch at the defaults, an epoch one step: NAD's 10 + 20 epochs left
    # BatchNorm's running statistics behind the moving weights (test acc 34%; 91% with batch statistics), I-BAU's
    # 5 rounds were 5 Adam steps; at 16 an epoch is 4 steps
    b.nad.update(batch_size=16, log_every=20)
    b.ibau.update(batch_size=16, log_every=10)
    # RNP's 10-image subset is one batch, an epoch one mask step: after the default 20 the recovery's accuracy on it
    # was still at chance (threat-2 BadNets, seed 0); it is back (0.9-1.0) from about 300 steps
    b.rnp.recover_epochs = 500
  return c


ENCODER_DEFENSES = ("distill", "nad", "mimic", "ssl_cleanse", "decree", "clp")


def encoder_setting(defense: str, attack: str, downstream: str, quick: bool) -> ml_collections.ConfigDict:
  """An encoder-side `defense` on the distillation defense's setting (configs/distill.py's stages, its defender
  subset and evaluation): the clean and the `attack`-poisoned encoder, then the defense's detection (on both) or
  cleaned encoder. defense = distill (the distillation defense itself) | nad (its poisoned-copy student: NAD on the
  encoder) | mimic | ssl_cleanse | decree (a detector; a flagged suspect's trigger goes to SSL-Cleanse's
  mitigator) | clp (data-free pruning of the encoder's channels).

  Defaults (sources in docs/baselines.md): DECREE GiantSeaweed/DECREE main.py; SSL-Cleanse its README and cfg; MIMIC
  wssun/MIMIC (MI-weighted AT, random student, the poisoned encoder as teacher, clone weight 1); CLP BackdoorBench's
  u 3. Every method that reads data reads the same defender subset (config.defense.clean_fraction).
  """
  if defense not in ENCODER_DEFENSES:
    raise ValueError(f"defense {defense!r} runs against threats 1-3 (threat=1|2|3); on the encoder setting "
                     f"(attack={attack}) use one of {', '.join(ENCODER_DEFENSES)}")
  c = distill_config.experiment(attack, downstream, "finetuned", "warmup", "at", quick)
  c.experiment = "encoder_defense"
  c.baseline = ml_collections.ConfigDict(dict(
      defense=defense,
      decree=dict(shadow_images=1000, batch_size=256, epochs=1000, lrs=(0.5, 0.1, 0.05), lr_epochs=(30, 50),
                  similarity_threshold=0.99, init_lambda=1e-3, lambda_factor=5.0, patience=5, lambda_min=1e-5,
                  stop_patience=10, threshold=0.1),
      ssl_cleanse=dict(num_clusters=0, min_clusters=2, max_clusters=30, window=10, kmeans_restarts=30, trigger_lr=0.1,
                       trigger_batch_size=32, trigger_epochs=1000, lam=0.1, attack_succ_threshold=0.99,
                       knn_sample_num=1000, patience=5, lam_multiplier=1.5, anomaly_threshold=2.0,
                       optim=common.optim("adam", 3e-3, 1e-6), train=common.train(1536, 500, 10, 100),
                       warmup_steps=500, drop_epochs=(50, 25), drop_factor=0.2, alpha_1=1.0, alpha_4=1.0,
                       head=dict(hidden=1024, dim=64), predictor_hidden=1024,
                       augment=common.augment((0.2, 1.0)).to_dict() | dict(gray_prob=0.1)),
      mimic=dict(epochs=1000, lr=1e-2, clone_weight=1.0, base_weight=1000.0, momentum_weight=10000.0,
                 mi_epochs=200, mi_lr=1e-3, mi_weight_decay=1e-5, mi_hidden=512, mi_batch_size=128,
                 mi_last_epochs=10),
      clp=dict(u=3.0, std_ddof=1, bn_eps=0.0)))
  if quick:
    b = c.baseline
    b.mimic.update(epochs=60, mi_epochs=20, mi_batch_size=64, mi_last_epochs=5)
    b.ssl_cleanse.update(max_clusters=10, window=5, kmeans_restarts=10, trigger_epochs=12, patience=2,
                         knn_sample_num=128, train=dict(batch_size=64, epochs=12, log_every=8, checkpoint_every=24),
                         warmup_steps=5, drop_epochs=(2, 1))  # ~30 s per detection, ~50 s of mitigation on CPU
    b.decree.update(epochs=60)  # the quick encoders stop early by epoch 30-46 (BadEncoder seed 0); ~25 s each on CPU
  return c
