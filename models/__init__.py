from .paca_vit import *  # noqa
