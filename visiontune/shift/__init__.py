"""`visiontune shift`: how images from another domain differ from a run's own, for its model:
the numbers on arrays (`analysis`), the report around them (`report.shift_report`)."""
