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
let cookies = {};
const sandbox = {
    window: { location: { hostname: 'pve1.example.com' } },
    gettext: (s) => s,
    URL: URL,
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
    String: {
        htmlEncode: (s) => String(s).replace(/&/g, '&amp;').replace(/</g, '&lt;').replace(/"/g, '&quot;'),
        format: (f, ...a) => f.replace(/\{(\d+)\}/g, (m, i) => a[Number(i)]),
    },
    state: { Manager: { get: (key) => (key === 'GuiCap' ? caps : undefined) } },
    util: { Cookies: { get: (name) => (name in cookies ? cookies[name] : null) } },
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

// The tab for node pve2, built as PVE builds the node view's panels.
const instance = Object.assign(Object.create(panel), {
    pveSelNode: { data: { node: 'pve2' } },
    callParent: function() { this.built = true; },
    on: function() {},
});
panel.initComponent.call(instance);
assert.ok(instance.built);
assert.strictEqual(instance.nodename, 'pve2', 'the node PVE selected');
assert.strictEqual(instance.tbar[0].text, 'Node pve2', 'the toolbar names the node');
assert.strictEqual(instance.layout, 'fit');
assert.strictEqual(JSON.stringify(instance.items.map((i) => i.itemId)), '["signetView"]', 'the frame goes in one sized item');
const P = sandbox.Signet.Plugin;

// Where a node is reached: the node PVE answers from (local) under the name in the
// address bar, another at its IP from the cluster's status, an unlisted one by name.
const status = [
    { type: 'cluster', name: 'c' },
    { type: 'node', name: 'pve1', ip: '192.0.2.1', local: 1 },
    { type: 'node', name: 'pve2', ip: '192.0.2.2', local: 0 },
    { type: 'node', name: 'pve3', ip: '2001:db8::3', local: 0 },
];
assert.strictEqual(P.hostFor('pve1', status, 'pve1.example.com'), 'pve1.example.com');
assert.strictEqual(P.hostFor('pve2', status, 'pve1.example.com'), '192.0.2.2');
assert.strictEqual(P.hostFor('pve9', status, 'pve1.example.com'), 'pve9');
assert.strictEqual(P.hostFor('pve2', [], 'pve1.example.com'), 'pve2');
// Without the cluster's status (Sys.Audit on / is needed), the node's own network.
const network = [
    { iface: 'lo', type: 'loopback', address: '127.0.0.1', active: 1 },
    { iface: 'eno1', active: 1 },
    { iface: 'vmbr1', address: '10.0.0.2', active: 1 },
    { iface: 'vmbr0', address: '192.0.2.2', gateway: '192.0.2.254', active: 1 },
];
assert.strictEqual(P.hostFromNetwork('pve2', network, 'pve1.example.com'), '192.0.2.2', 'the gateway\'s');
assert.strictEqual(P.hostFromNetwork('pve2', network.slice(0, 3), 'pve1.example.com'), '10.0.0.2');
assert.strictEqual(P.hostFromNetwork('pve2', network, '10.0.0.2'), '10.0.0.2', 'the address browsed');
assert.strictEqual(P.hostFromNetwork('pve2', [], 'x'), 'pve2');
const port = instance.signetPort;
assert.ok(/^[0-9]+$/.test(port), port);
console.log(P.url(P.hostFor('pve1', status, sandbox.window.location.hostname), port));
assert.strictEqual(P.url('192.0.2.2', port, 'proxmox-dark'), 'https://192.0.2.2:' + port + '/?theme=proxmox-dark');
const v6 = P.url(P.hostFor('pve3', status, 'x'), port);
assert.strictEqual(v6, 'https://[2001:db8::3]:' + port + '/');
assert.strictEqual(P.origin(v6), 'https://[2001:db8::3]:' + port, 'the origin messages come from');
assert.strictEqual(P.url('[2001:db8::1]', port).startsWith('https://[2001:db8::1]:'), true);

// PVE's theme cookie, as PVE's "Color Theme" window sets it.
assert.strictEqual(P.theme(), 'auto');
cookies.PVEThemeCookie = '__default__';
assert.strictEqual(P.theme(), 'auto');
cookies.PVEThemeCookie = 'proxmox-dark';
assert.strictEqual(P.theme(), 'proxmox-dark');
cookies.PVEThemeCookie = 'crisp';
assert.strictEqual(P.theme(), 'crisp');
cookies.PVEThemeCookie = '<b>';
assert.strictEqual(P.theme(), 'auto');

// The help names the URL, the port, the firewall rule and the certificate, escaped.
const help = P.helpHtml('pve2', 'https://192.0.2.2:' + port + '/', port);
for (const want of ['https://192.0.2.2:' + port + '/', 'TCP port ' + port, 'IN ACCEPT -p tcp -dport ' + port,
    'open it once in a new tab', 'Datacenter → Firewall', 'systemctl status signetd']) {
    assert.ok(help.includes(want), want + ' in ' + help);
}
assert.ok(!P.helpHtml('<x>', 'u', port).includes('<x>'), 'escaped');
// The handshake: only the frame the tab made, from signetd's exact origin, counts.
const listeners = {};
sandbox.window.addEventListener = (t, f) => { listeners[t] = f; };
sandbox.window.removeEventListener = (t) => { delete listeners[t]; };
const timers = [];
sandbox.setTimeout = (f, ms) => { timers.push({ f, ms }); return timers.length; };
sandbox.clearTimeout = (id) => { if (id) { timers[id - 1] = null; } };
const pending = () => timers.filter((t) => t);
const fire = () => { const t = pending().pop(); timers[timers.indexOf(t)] = null; t.f(); };
const frameWindow = {};
let frameLoaded = null;
const frame = {
    contentWindow: frameWindow,
    addEventListener: (t, f) => { frameLoaded = f; },
    removeEventListener: () => { frameLoaded = null; },
};
const origin = 'https://192.0.2.2:7721';
const readies = [];
let silences = 0;
const watch = P.watch(frame, origin, {
    readyTimeout: 15000, afterLoadGrace: 2000,
    ready: (m) => readies.push(m), silent: () => silences++,
});
const ready = { signet: 'ready', node: 'pve2', page: '/', login: false };
listeners.message({ origin: 'https://192.0.2.9:7721', source: frameWindow, data: ready });
listeners.message({ origin: origin, source: {}, data: ready });
listeners.message({ origin: origin, source: frameWindow, data: { signet: 'other' } });
assert.strictEqual(readies.length, 0, 'another origin, window or message is ignored');
assert.deepStrictEqual(pending().map((t) => t.ms), [15000]);
fire();
assert.strictEqual(silences, 1, 'nothing said within the time: the help');
listeners.message({ origin: origin, source: frameWindow, data: ready });
assert.strictEqual(readies.length, 1);
assert.strictEqual(readies[0].node, 'pve2');
frameLoaded();
assert.strictEqual(pending().length, 0, 'the page that said it loaded needs no timer');
frameLoaded(); // the next page in the frame loads without a word (signetd gone)
assert.deepStrictEqual(pending().map((t) => t.ms), [2000]);
fire();
assert.strictEqual(silences, 2);
watch.stop();
assert.strictEqual(listeners.message, undefined, 'stopped');
console.log('panel ok');
