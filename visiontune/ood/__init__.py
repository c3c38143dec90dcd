"""Out-of-distribution scores of a classifier's inputs (`detector`) and their fitting on a run (`fit`)."""
