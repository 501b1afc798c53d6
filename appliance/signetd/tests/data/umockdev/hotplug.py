# Drives a USB hotplug scenario under a umockdev testbed for a test program.
# Run as: umockdev-wrapper /usr/bin/python3 hotplug.py CMD [ARGS...]
# CMD prints "signet-umockdev: <word>" lines; each step waits for the program's word
# before changing the fake sysfs, so nothing here depends on timing.
import gi, subprocess, sys
gi.require_version('UMockdev', '1.0')
from gi.repository import UMockdev

PREFIX = "signet-umockdev: "
tb = UMockdev.Testbed.new()  # sets UMOCKDEV_DIR; the child inherits it and LD_PRELOAD
child = subprocess.Popen(sys.argv[1:], stdout=subprocess.PIPE, text=True)

def expect(word):
    for line in child.stdout:
        sys.stdout.write(line)
        at = line.find(PREFIX)  # libtest may have started the line with the test's name
        if at >= 0:
            got = line[at + len(PREFIX):].strip()
            if got != word:
                sys.exit(f"hotplug.py: expected {word!r} from the program, got {got!r}")
            return
    sys.exit(f"hotplug.py: the program ended before saying {word!r} (rc {child.wait()})")

def token(port, devnum, serial):
    return tb.add_device('usb', f'1-{port}', None,
        ['idVendor', '0529', 'idProduct', '0620', 'serial', serial, 'busnum', '1',
         'devnum', str(devnum), 'manufacturer', 'SafeNet', 'product', 'Token JC'],
        ['DEVTYPE', 'usb_device', 'ID_VENDOR_ID', '0529', 'ID_MODEL_ID', '0620',
         'ID_SERIAL_SHORT', serial, 'PRODUCT', '529/620/100', 'DEVNUM', '%03d' % devnum,
         'BUSNUM', '001'])

expect("ready")
a = token(2, 5, "0123ABCD")
expect("added")
tb.uevent(a, 'remove'); tb.remove_device(a)
expect("removed")
a = token(2, 6, "0123ABCD")
expect("readded")
b = token(3, 7, "0456CDEF")
expect("second")
for line in child.stdout:
    sys.stdout.write(line)
sys.exit(child.wait())
