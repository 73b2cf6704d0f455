"""The crypto recipes keybroker uses; other packages call these instead of cryptography's primitives."""
