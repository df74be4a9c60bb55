"""The only package that imports ray (and, with sharding, deepspeed): workers and actors that
call into the pure math modules and return data to the driver."""
