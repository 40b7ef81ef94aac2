"""After the pass: aggregate the per-image records, test them, intervene, and judge
each class (docs/flags.md).

    intervals     CIs of means (bootstrap-t) and rates (Wilson)
    aggregate     per-group accumulators (mergeable) and their summaries with CIs
    flags         heatmap tests: one-sided tests, Benjamini-Hochberg, effect floors
    associations  slices that drive a class (Mantel-Haenszel false-positive difference)
    fill          interventions on an image (object removed, kept, or moved)
    probes        Mixed-Rand, Mixed-Same and the transplant test, sampled sequentially
    probe_stats   their rates, gaps and excesses with CIs; when sampling may stop
    trust         the maps' own checks (randomisation, random logit, faithfulness)
    strategies    per-class CAM clusters (SpRAy)
    verdicts      causal evidence and the decision table: bias-driven, suspected, ok
    examples      the report's example images and their Guided Grad-CAM pictures
    tables        the analysis tables of a run, written and read back
    analyse       runs every stage above on a stored run
"""
