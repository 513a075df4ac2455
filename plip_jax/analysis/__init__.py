"""Model-agnostic analysis on top of the `Model` interface: generation (`generation`), logit lens
(`lens`), linear probes (`probes`), effect metrics such as KL (`metrics`), statistics (`stats`) and
test-preservation scoring of generated code (`test_preservation`)."""
