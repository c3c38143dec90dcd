"""Shared toolkit of visiontune's HTML reports: templates, number formatting and inline images."""
