"""The zero-shot prompt ensemble: one set of templates for `/v1/classify`, templated collection search and
`hqclip eval`, so the evaluation measures the classifier that is served."""

# The seven templates the CLIP authors found best on ImageNet (CLIP's notebook "Prompt Engineering for ImageNet").
DEFAULT_TEMPLATES = (
    "itap of a {}.",
    "a bad photo of the {}.",
    "a origami {}.",
    "a photo of the large {}.",
    "a {} in a video game.",
    "art of the {}.",
    "a photo of the small {}.",
)
