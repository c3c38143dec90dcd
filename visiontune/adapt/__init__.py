"""Domain adaptation of a trained classifier run: `visiontune adapt RUN --target DIR --method ...`.

The cores are pure torch (batchnorm.py: AdaBN, mcc.py: the Minimum Class Confusion loss); loop.py
trains and scores the epochs, data.py reads the target images and labels, and workflow.py writes
the adapted model as a new run directory with its lineage.
"""
