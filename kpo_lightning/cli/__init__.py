"""The command line: `run.py` / `kpo-train` (`main`), typed configs loaded from YAML presets and overrides
(`config_loading`), the checks that refuse a bad config in one line (`config_checks`), the training and evaluation
jobs that build a Trainer (`train`, `evaluate`), the memory budget of `--plan` (`plan`) and the version banner
(`versions`).

Top layer: may import every other sub-package; none imports it.
"""
