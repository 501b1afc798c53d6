package PVE::INotify;
# A stand-in for Proxmox VE's PVE::INotify, for tests only: the node's name.

use strict;
use warnings;

sub nodename { return 'stand-in-node'; }

1;
