"""The paper's claims in miniature: `python -m sar_fast.study --out DIR [--quick]`.

One teacher-forcing base run of the embedded model (digits + grey-level tokenizer, the
trainer's `tiny` preset), trained in chunks until its held-out NLL stops improving; then
every arm continues from that base for the same number of steps, with the same data order
and draws per seed (the seed is the trainer's --seed, so seed k of every arm sees the same
batches):

- tf: continued teacher forcing (the control);
- sar_published: SAR as the public code runs it (last transition, gamma 0.01, CFG sampling);
- sar_all_{argmax,sample,cfg}_g{0.01,0.1,1}: SAR on all transitions (the paper's Eq. 6);
- sf_full, sf_alternate, sf_interleave, sf_hybrid: naive student forcing (Table 3).

Each (arm, seed) is one `sar_fast.train.Trainer` run (in a worker process, single rank),
then evaluated on the held-out digits ('val' split): TF NLL per token and per scale, the
exposure gap per scale (argmax and sampled inputs; sar_fast.metrics.exposure), and the
digits Fréchet distance and class accuracy of sampled images (sar_fast.metrics.digits, the
same images per seed in every arm: per-image noise as in sar_fast.evaluate). Each result is
written as JSON the moment it exists, so a rerun skips what is done. Then: paired
differences against tf with a seeded bootstrap interval, a table (study.md, study.json),
one plot (study.png) and a verdict per claim, given only where the interval excludes 0.

`--suite oracle` runs the same design on a frozen random teacher whose likelihood is exact
(precision and coverage NLL instead of the digits metrics): sar_fast.study.oracle_suite.
"""
