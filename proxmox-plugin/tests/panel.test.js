// Runs signet-panel.js (as install.sh installs it) under node with a small stand-in for
// the parts of ExtJS it uses, and checks the Signing tab it adds to PVE's node view.
// Usage: node panel.test.js INSTALLED_SIGNET_PANEL_JS; exits 1 on the first failure.
'use strict';

const fs = require('fs');
const vm = require('vm');
const assert = require('assert');

const file = process.argv[2];
const source = fs.readFileSync(file, 'utf8');

let caps = { nodes: { 'Sys.Audit': 1 } };
const classes = {};
const sandbox = {
    window: { location: { hostname: 'pve1.example.com' } },
    gettext: (s) => s,
};
sandbox.Ext = {
    define: function(name, body) {
        classes[name] = body;
        if (body.singleton) {
            // Ext puts a singleton at its dotted name.
            const parts = name.split('.');
            let at = sandbox;
            for (const p of parts.slice(0, -1)) {
                at = at[p] = at[p] || {};
            }
            at[parts[parts.length - 1]] = body;
        }
    },
    apply: Object.assign,
    isArray: Array.isArray,
    String: { htmlEncode: (s) => String(s).replace(/&/g, '&amp;').replace(/</g, '&lt;') },
    state: { Manager: { get: (key) => (key === 'GuiCap' ? caps : undefined) } },
};
vm.createContext(sandbox);
vm.runInContext(source, sandbox, { filename: file });

assert.ok(!source.includes('@SIGNET_WEB_PORT@'), 'install.sh filled in the port');
const override = classes['Signet.panel.Config'];
assert.strictEqual(override.override, 'PVE.panel.Config');
const panel = classes['Signet.node.Signing'];
assert.strictEqual(panel.extend, 'Ext.panel.Panel');
assert.strictEqual(panel.alias, 'widget.signetNodeSigning');

// The node view's items as PVE.node.Config hands them on, for one node.
function nodeConfig() {
    let parentCalled = 0;
    return {
        $className: 'PVE.node.Config',
        pveSelNode: { data: { node: 'pve1' } },
        items: [
            { itemId: 'summary' }, { itemId: 'services' }, { itemId: 'tasks' }, { itemId: 'support' },
        ],
        callParent: function() { parentCalled++; this.parentCalled = parentCalled; },
    };
}

// A user with Sys.Audit gets the tab, once, before Task History.
const node = nodeConfig();
override.initComponent.call(node);
assert.strictEqual(node.parentCalled, 1, 'PVE.panel.Config still builds the view');
assert.deepStrictEqual(node.items.map((i) => i.itemId),
    ['summary', 'services', 'signet-signing', 'tasks', 'support']);
const tab = node.items[2];
assert.strictEqual(tab.title, 'Signing');
assert.strictEqual(tab.xtype, 'signetNodeSigning');
assert.strictEqual(tab.iconCls, 'fa fa-certificate');
assert.strictEqual(tab.nodename, 'pve1');
override.initComponent.call(node);
assert.strictEqual(node.items.filter((i) => i.itemId === 'signet-signing').length, 1, 'added once');

// Other config panels (a VM's, the datacenter's) are left alone.
const qemu = nodeConfig();
qemu.$className = 'PVE.qemu.Config';
override.initComponent.call(qemu);
assert.strictEqual(qemu.items.length, 4);

// A user without Sys.Audit on the node does not see the tab.
caps = { nodes: {} };
const restricted = nodeConfig();
override.initComponent.call(restricted);
assert.strictEqual(restricted.items.length, 4);
assert.strictEqual(restricted.parentCalled, 1);

// The tab shows signetd's UI from the same host, on signetd's port.
const instance = Object.assign(Object.create(panel), {
    callParent: function() { this.built = true; },
});
panel.initComponent.call(instance);
assert.ok(instance.built);
const frame = instance.items[0];
assert.strictEqual(frame.autoEl.tag, 'iframe');
const url = frame.autoEl.src;
console.log(url);

sandbox.window.location.hostname = '2001:db8::1';
assert.strictEqual(panel.signetUrl.call(instance).startsWith('https://[2001:db8::1]:'), true);
console.log('panel ok');
