"""Test model with an image input: returns the decoded image tensor unchanged, so a test can compare
it with what Pillow decodes locally."""


class Identity:
    def __init__(self, model_dir, manifest) -> None:
        pass

    def __call__(self, inputs):
        return {"pixels": inputs["image"]}
