"""Pure functions of tensors: N:M block views and top-n masks (:mod:`.nm`), the schedule
(:mod:`.schedule`), LMA / SAD / OBF (:mod:`.evolution`), RigL's drop and grow in N:M blocks
(:mod:`.rigl`), compact kept-set codes (:mod:`.kept`) and transposable 2:4 masks
(:mod:`.transposable`); and the argument checks every layer shares (:mod:`.validation`). No
module here holds state."""
