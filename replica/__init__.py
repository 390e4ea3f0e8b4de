"""A replica of either pool as Ray actors: the actor shell both roles share (actor.py), the
tensor-parallel follower ranks (ranks.py), the torch-free router<->replica contract
(contract.py), and which cores its threads run on (affinity.py, os calls only). Nothing is
imported here, so the router can import the contract alone."""
