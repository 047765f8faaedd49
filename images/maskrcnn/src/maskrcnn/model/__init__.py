"""The network both processes share: ``format`` (model.json and the file checks; no torch), ``architectures``
(the builders, lite's modules, pretrained weights, save and load) and ``roi_align`` (lite's training-time op).

Imports nothing: ``serve`` checks a saved model through ``maskrcnn.model.format`` before torch is loaded.
"""
