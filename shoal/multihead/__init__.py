"""Multi-head classifiers for edge devices (paper 001): one frozen backbone, one head per label
category, compared with hard-coded combinations (HC) and one model per category (2M)."""
