"""The engine: load a Keras model, cut it at the target layer, and compute class
activation maps in one compiled step on any Keras backend.

    models       load models safely
    graph        the layer graph (nested models included) and the target layer
    cut          the model cut at the target layer: features and logit head
    registry     the CAM methods by name (one decorated function each)
    cam_methods  the built-in formulas (Grad-CAM, HiResCAM, Grad-CAM++, XGrad-CAM, ...)
    backends     the backward pass through the head on TensorFlow, JAX or PyTorch
    explain      ``GradCAM``: batched maps, predictions and counterfactual maps
    maps         maps as arrays: padding, upsampling, downscaling, the CAM sets
    guided       Guided backpropagation and Guided Grad-CAM
"""
