"""Ablations: the distillation defense's comparison grid (cells, shared stages, table, bad input) and T-Core's
component ablation (shared stages, table)."""

import contextlib
import io
import os
import tempfile

from absl.testing import absltest

from helpers import config
from jaxpurify import ablate
from jaxpurify.experiments import distill, tcore
from jaxpurify.pipeline import derived_config


def quick(*overrides):
  return config("distill:quick", *overrides)


class AblateTest(absltest.TestCase):

  def test_one_factor_at_a_time_grid(self):
    cells = distill.cells(quick(), "oat")
    labels = list(cells)
    self.assertEqual(labels[0], "finetuned/warmup/at")  # the base cell first
    # 4 teachers + 3 students + 8 losses, the base cell counted once.
    self.assertLen(labels, 1 + 3 + 2 + 7)
    self.assertEqual({label.split("/")[0] for label in labels},
                     {"finetuned", "poisoned", "finetuned->resnet34", "finetuned->width16"})
    self.assertEqual({label.split("/")[1] for label in labels}, {"warmup", "random", "poisoned_copy"})
    self.assertEqual({label.split("/")[2] for label in labels},
                     {"at", "afd", "fitnet", "cc", "kd", "clone", "sp", "at+clone"})
    # Every non-base cell differs from the base in exactly one factor.
    for label in labels[1:]:
      self.assertEqual(sum(a != b for a, b in zip(label.split("/"), labels[0].split("/"))), 1, label)
    atd = derived_config(quick(), cells["finetuned/warmup/at+clone"])
    self.assertEqual((atd.defense.loss.name, atd.defense.loss.clone_weight), ("at", 1.0))
    wide = derived_config(quick(), cells["finetuned->width16/warmup/at"])
    self.assertEqual(wide.defense.student.model.width, 16)

  def test_full_grid_and_a_base_cell_of_another_setting(self):
    self.assertLen(distill.cells(quick(), "full"), 4 * 3 * 8)
    cells = distill.cells(quick("defense.teacher.kind=poisoned", "defense.loss.name=kd"), "oat")
    self.assertEqual(next(iter(cells)), "poisoned/warmup/kd")

  def test_cells_share_the_stages_their_config_leaves_unchanged(self):
    base = quick()
    cells = distill.cells(base, "oat")
    shared = lambda label: distill.shared_stages(base, derived_config(base, cells[label]))
    self.assertEqual(shared("finetuned/warmup/kd"), ["pretrain", "attack", "teacher", "warmup"])
    self.assertEqual(shared("poisoned/warmup/at"), ["pretrain", "attack", "warmup"])
    self.assertEqual(shared("finetuned/random/at"), ["pretrain", "attack", "teacher"])
    self.assertEqual(shared("finetuned->resnet34/warmup/at"), ["pretrain", "attack", "teacher"])

  def test_table(self):
    row = dict(cell="finetuned/warmup/at", teacher="finetuned", student="warmup", loss="at", poisoned_acc=0.9,
               poisoned_asr=0.98, acc=0.91, asr=0.01, asr_all=0.02, delta_acc=0.01, delta_asr=-0.97)
    text = distill.table([row])
    self.assertIn("| finetuned | warmup | at | 91.00 | 1.00 | 2.00 | +1.00 | -97.00 |", text)
    self.assertIn("acc 90.00, asr 98.00", text)

  def test_bad_input_is_one_error_line(self):
    for argv in (["--config", "configs/simclr.py:quick"], ["--config", "configs/distill.py:quick", "--grid", "x"],
                 ["--config", "configs/distill.py:quick", "--grid", "none"]):  # none: only with --seeds
      out, err = io.StringIO(), io.StringIO()
      with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        status = ablate.main(argv)
      self.assertEqual(status, 2, argv)
      self.assertTrue(err.getvalue().startswith("error: ") and err.getvalue().count("\n") == 1, err.getvalue())

  def test_tcore_cells_reuse_only_the_stages_upstream_of_the_removed_component(self):
    base = tempfile.mkdtemp()
    for stage in ("pretrain", "poison", "finetune_clean_ft_all", "tcore_sift", "expand0_pretrain",
                  "expand0_confuse", "tcore_filter", "boot0_ft_all"):
      os.makedirs(os.path.join(base, stage))
    setting = ["finetune_clean_ft_all", "poison", "pretrain"]
    self.assertEqual(tcore.shared_stages(base, "sift"), setting)
    self.assertEqual(tcore.shared_stages(base, "expand"), setting + ["tcore_sift"])
    self.assertEqual(tcore.shared_stages(base, "filter"),
                     ["expand0_confuse", "expand0_pretrain"] + setting + ["tcore_sift"])
    self.assertNotIn("boot0_ft_all", tcore.shared_stages(base, "boot"))
    self.assertIn("tcore_filter", tcore.shared_stages(base, "boot"))

  def test_tcore_table_and_a_preset_skip_is_refused(self):
    row = dict(removed="(none)", protocol="ft_all", acc=0.9667, asr=0.0, asr_all=0.0889, clean_acc=0.9889,
               poisoned_acc=0.9833, poisoned_asr=0.9383, seed_purity=1.0, precision=0.1843, recall=0.7361,
               trusted=653, trusted_purity=0.9418, pruned=9, final_trusted={"count": 826, "poisoned": 0})
    text = tcore.table([row, dict(row, removed="expand", precision=None, recall=None)])
    self.assertIn("| (none) | ft_all | 96.67 | 0.00 | 8.89 | 100.00 | 18.43 | 73.61 | 653 (94.18) | 9 | 826 (0) |",
                  text)
    self.assertIn("| expand | ft_all | 96.67 | 0.00 | 8.89 | 100.00 | – | – |", text)
    self.assertIn("Clean fine-tuning: acc 98.89; undefended (poisoned): acc 98.33, asr 93.83", text)
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
      status = ablate.main(["--config", "configs/tcore.py:quick", "--config.tcore.skip=('boot',)",
                            "--workdir", tempfile.mkdtemp()])
    self.assertEqual(status, 2)
    self.assertIn("leave config.tcore.skip empty", err.getvalue())


if __name__ == "__main__":
  absltest.main()
