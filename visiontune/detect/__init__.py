"""Object detection: annotations in the common formats, the R-CNN region pipeline and Faster R-CNN."""
