// Signet: the "Signing" tab in the node view of the Proxmox VE web UI.
//
// It shows signetd's web UI (served by signetd on the node, port @SIGNET_WEB_PORT@, with
// the node's PVE certificate) in the tab. No second login: the browser sends its PVE
// login cookie to signetd, which checks it against the PVE API (Sys.Audit on
// /nodes/NODE to see, Sys.Modify to act). install.sh puts this file in
// /usr/share/pve-manager/js/ and its <script> line after pvemanagerlib.js in
// index.html.tpl.

Ext.define('Signet.node.Signing', {
    extend: 'Ext.panel.Panel',
    alias: 'widget.signetNodeSigning',

    layout: 'fit',
    border: false,

    // signetd's [web] listen port; install.sh fills it in.
    signetPort: '@SIGNET_WEB_PORT@',

    signetUrl: function() {
        var me = this;
        var host = window.location.hostname;
        if (host.indexOf(':') >= 0) {
            host = '[' + host + ']'; // an IPv6 address
        }
        return 'https://' + host + ':' + me.signetPort + '/';
    },

    initComponent: function() {
        var me = this;
        var url = me.signetUrl();

        Ext.apply(me, {
            tbar: [
                {
                    text: gettext('Open in new tab'),
                    iconCls: 'fa fa-external-link',
                    handler: function() {
                        window.open(url, '_blank', 'noopener');
                    },
                },
                '->',
                {
                    xtype: 'tbtext',
                    text: Ext.String.htmlEncode(url),
                },
            ],
            items: [
                {
                    xtype: 'component',
                    itemId: 'signetFrame',
                    autoEl: {
                        tag: 'iframe',
                        src: url,
                        title: 'Signet',
                        style: 'border: 0; width: 100%; height: 100%;',
                    },
                },
            ],
        });

        me.callParent();
    },
});

// The node view builds its tabs (PVE.node.Config) and hands them to PVE.panel.Config,
// which turns them into the navigation tree: the tab goes in just before "Task
// History", for users who may see the node's system state (Sys.Audit).
Ext.define('Signet.panel.Config', {
    override: 'PVE.panel.Config',

    initComponent: function() {
        var me = this;
        if (me.$className === 'PVE.node.Config' && Ext.isArray(me.items)) {
            Signet.Plugin.addSigningTab(me, Ext.state.Manager.get('GuiCap'));
        }
        me.callParent();
    },
});

Ext.define('Signet.Plugin', {
    singleton: true,

    // Adds the Signing tab to a node view's items once; answers whether it did.
    addSigningTab: function(config, caps) {
        if (!caps || !caps.nodes || !caps.nodes['Sys.Audit']) {
            return false;
        }
        var items = config.items;
        var i;
        for (i = 0; i < items.length; i++) {
            if (items[i].itemId === 'signet-signing') {
                return false;
            }
        }
        var at = items.length;
        for (i = 0; i < items.length; i++) {
            if (items[i].itemId === 'tasks') {
                at = i;
                break;
            }
        }
        items.splice(at, 0, {
            title: gettext('Signing'),
            iconCls: 'fa fa-certificate',
            itemId: 'signet-signing',
            xtype: 'signetNodeSigning',
            nodename: config.pveSelNode && config.pveSelNode.data ? config.pveSelNode.data.node : undefined,
        });
        return true;
    },
});
