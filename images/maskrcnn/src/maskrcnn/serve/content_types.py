"""The content types ``POST /invocations`` takes and answers, for the server and for those who describe it.

A leaf that imports nothing: :mod:`maskrcnn.serve.codec` decodes and encodes these, and the pipeline's model
registry records them (``SupportedContentTypes``, ``SupportedResponseMIMETypes``) without loading the codec's
numpy and Pillow.
"""

IMAGE_TYPES = ("image/jpeg", "image/png", "application/x-image")  # the body is one image file
JSON_TYPE = "application/json"
PNG_TYPE = "image/png"
SUPPORTED_TYPES = (*IMAGE_TYPES, JSON_TYPE)  # what a request may be
RESPONSE_TYPES = (JSON_TYPE, PNG_TYPE)  # what a response may be, the first when the Accept header names none
