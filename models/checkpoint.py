import os
RELEASE_BASE_URL = "https://github.com/iVMCL/PaCaViT/releases/download/pacavit"
def release_url(filename, base=None):
    return f"{(base or RELEASE_BASE_URL).rstrip('/')}/{filename}"
def load_pretrained(model, source, strict=True):
    raise NotImplementedError
