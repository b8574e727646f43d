"""Label values of the masks the pipeline writes."""

BACKGROUND_LABEL = 0
LIVER_LABEL = 1
TUMOR_LABEL = 2
