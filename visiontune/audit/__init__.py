"""What is wrong with a labelled image set before a number is trusted: label issues from
out-of-fold probabilities (cleanlab), near-duplicates and cross-split leakage, outliers
(`analysis`), run end to end on frozen features by `workflow.audit`."""
