"""`visiontune benchmark`: inference and training throughput of a run or a backbone, per plan."""
