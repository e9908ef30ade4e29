"""The gradient and operator layer, below both the balancers and the diagnostics: loss closures
(:mod:`.losses`), per-task gradients and :class:`TaskStats` (:mod:`.task_gradients`, one pass with
:mod:`.task_split`), and Hessian-vector product operators (:mod:`.hessian`)."""
