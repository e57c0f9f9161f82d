"""Pre-sampling from the initial policy: the split (D_pef / D_exp), the ref store, and train's
inputs made from them."""
