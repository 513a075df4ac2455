"""RWKV-6 recurrent-state tools (spec 5.4, 5.5, 6 "State tools"), one module per experiment:

* `samples`: corpus samples with PLIP's exact char -> token rule, default layer, window checks;
* `edits`: the kernel: every (sample, state edit) forward of an experiment in one jitted program, with the
  baseline and a no-op edit (the noise floor) in the same vmapped batch; KL in float64 on the host and the
  change of the mean next-token NLL, each with its floor;
* `ablation`: knockout of the marker's state write (single layer, window, scans) with a distance-matched
  control position (PLIP `state_ablation_experiment`);
* `steering`: dose-response of the marker's state-write scale (PLIP `state_steering_experiment`);
* `generation`: state-steered generation scored for test preservation (PLIP `state_steering_generate`);
* `persistence`: test rates by marker distance x scale x temperature (PLIP `state_steering_persistence`);
* `plots`: the PNGs of the four binaries (mean ± s.e. or Wilson 95 % CI, labelled).

Every experiment returns a dataclass whose `to_json()` keeps PLIP-rs's field names and adds new ones;
tables are formatted by the `format_*` functions next to it.
"""
