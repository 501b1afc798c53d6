// A stand-in, for a browser, for the parts of ExtJS and proxmox-widget-toolkit that
// signet-panel.js uses: Ext.define, a panel with a toolbar and a body (rendered as
// plain elements), Ext.util.Cookies, Ext.state.Manager's GuiCap and
// Proxmox.Utils.API2Request (fetch on /api2/json, as PVE's UI asks its API).
// It is not ExtJS: it runs the plugin's own code against PVE's interfaces, in a real
// browser, where tests/e2e/plugin.rs looks at what the tab does.
'use strict';
(function() {
    var classes = {};
    var aliases = {};
    window.gettext = function(s) {
        return s;
    };
    function htmlEncode(s) {
        return String(s).replace(/&/g, '&amp;').replace(/</g, '&lt;')
            .replace(/>/g, '&gt;').replace(/"/g, '&quot;');
    }
    window.Ext = {
        define: function(name, body) {
            classes[name] = body;
            if (body.alias) {
                aliases[body.alias.replace(/^widget\./, '')] = name;
            }
            if (body.singleton) {
                var parts = name.split('.');
                var at = window;
                parts.slice(0, -1).forEach(function(p) {
                    at = at[p] = at[p] || {};
                });
                at[parts[parts.length - 1]] = body;
            }
        },
        apply: function(to, from) {
            return Object.assign(to, from);
        },
        isArray: Array.isArray,
        String: {
            htmlEncode: htmlEncode,
            format: function(f) {
                var args = arguments;
                return f.replace(/\{(\d+)\}/g, function(m, i) {
                    return args[Number(i) + 1];
                });
            },
        },
        state: {
            Manager: {
                get: function(key) {
                    return key === 'GuiCap' ? window.standinCaps : undefined;
                },
            },
        },
        util: {
            Cookies: {
                get: function(name) {
                    var found = null;
                    document.cookie.split(';').forEach(function(c) {
                        var i = c.indexOf('=');
                        if (i > 0 && c.slice(0, i).trim() === name) {
                            found = decodeURIComponent(c.slice(i + 1));
                        }
                    });
                    return found;
                },
            },
        },
    };
    // As PVE's index.html.tpl sets it for the logged-in user.
    var ticket = window.Ext.util.Cookies.get('PVEAuthCookie') || '';
    window.Proxmox = {
        Setup: { auth_cookie_name: 'PVEAuthCookie' },
        UserName: ticket.split(':')[1] || '',
        Utils: {
            API2Request: function(opts) {
                fetch('/api2/json' + opts.url, { credentials: 'same-origin' })
                    .then(function(r) {
                        if (!r.ok) {
                            opts.failure({ status: r.status });
                            return null;
                        }
                        return r.json().then(function(j) {
                            opts.success({ result: j });
                        });
                    })
                    .catch(function() {
                        opts.failure({});
                    });
            },
        },
    };

    // A rendered component the panel finds with down('#itemId').
    function Item(el, cfg) {
        this.el = el;
        this.cfg = cfg;
    }
    Item.prototype.setText = function(html) {
        this.el.innerHTML = html;
    };
    Item.prototype.setDisabled = function(d) {
        this.el.disabled = !!d;
    };
    Item.prototype.getEl = function() {
        return { dom: this.el };
    };

    window.StandIn = {
        // The tab PVE's node view would add for `node`, through the plugin's override
        // of PVE.panel.Config.
        nodeViewItems: function(node) {
            var view = {
                $className: 'PVE.node.Config',
                pveSelNode: { data: { node: node } },
                items: [{ itemId: 'summary' }, { itemId: 'tasks' }],
                callParent: function() {},
            };
            classes['Signet.panel.Config'].initComponent.call(view);
            return view.items;
        },

        // Creates the xtype of `cfg` and renders it into `parent`, as Ext would.
        render: function(cfg, parent) {
            var proto = classes[aliases[cfg.xtype]];
            var me = Object.create(proto);
            Object.assign(me, cfg);
            var listeners = {};
            me.callParent = function() {};
            me.on = function(event, fn, scope) {
                (listeners[event] = listeners[event] || []).push(fn.bind(scope || me));
            };
            proto.initComponent.call(me);
            var root = document.createElement('div');
            root.className = 'standin-panel';
            var bar = document.createElement('div');
            bar.className = 'standin-tbar';
            var items = {};
            (me.tbar || []).forEach(function(t) {
                var el;
                if (t === '->') {
                    el = document.createElement('span');
                    el.style.flex = '1';
                } else if (t.xtype === 'tbtext') {
                    el = document.createElement('span');
                    el.innerHTML = t.text;
                } else {
                    el = document.createElement('button');
                    el.textContent = t.text;
                    el.disabled = !!t.disabled;
                    el.addEventListener('click', function() {
                        t.handler();
                    });
                }
                if (t.itemId) {
                    el.id = t.itemId;
                    items[t.itemId] = new Item(el, t);
                }
                bar.appendChild(el);
            });
            var body = document.createElement('div');
            body.className = 'standin-body';
            // The fit layout: each item fills the body.
            (me.items || []).forEach(function(c) {
                var el = document.createElement('div');
                el.style.cssText = 'width: 100%; height: 100%; ' + (c.style || '');
                if (c.itemId) {
                    items[c.itemId] = new Item(el, c);
                }
                body.appendChild(el);
            });
            root.appendChild(bar);
            root.appendChild(body);
            parent.appendChild(root);
            me.body = { dom: body };
            me.down = function(sel) {
                return items[sel.replace(/^#/, '')];
            };
            (listeners.afterrender || []).forEach(function(fn) {
                fn(me);
            });
            return me;
        },
    };
})();
