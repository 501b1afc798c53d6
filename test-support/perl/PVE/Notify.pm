package PVE::Notify;
# A stand-in for Proxmox VE's PVE::Notify (pve-cluster), for tests only: it records
# each notification as one JSON line in $ENV{SIGNET_TEST_NOTIFY_LOG}, after checking
# that the templates it names exist under $ENV{SIGNET_TEST_TEMPLATES}/default/ as
# proxmox-notify would look them up (NAME-subject.txt.hbs, NAME-body.txt.hbs,
# NAME-body.html.hbs). Its entry points have the real module's signatures.

use strict;
use warnings;

use JSON::PP;

my $send = sub {
    my ($severity, $template_name, $template_data, $fields, $config) = @_;
    my $dir = $ENV{SIGNET_TEST_TEMPLATES} or die "stand-in PVE::Notify: SIGNET_TEST_TEMPLATES is not set\n";
    for my $suffix (qw(subject.txt.hbs body.txt.hbs body.html.hbs)) {
        my $path = "$dir/default/$template_name-$suffix";
        die "stand-in PVE::Notify: no template $path\n" if !-f $path;
    }
    my $log = $ENV{SIGNET_TEST_NOTIFY_LOG} or die "stand-in PVE::Notify: SIGNET_TEST_NOTIFY_LOG is not set\n";
    open(my $fh, '>>', $log) or die "stand-in PVE::Notify: cannot open $log: $!\n";
    print $fh JSON::PP->new->canonical->encode({
        severity => $severity,
        template => $template_name,
        data => $template_data,
        fields => $fields,
    }), "\n";
    close($fh) or die "stand-in PVE::Notify: cannot write $log: $!\n";
};

sub notify {
    my ($severity, $template_name, $template_data, $fields, $config) = @_;
    $send->($severity, $template_name, $template_data, $fields, $config);
}

sub info { my @a = @_; $send->('info', @a); }
sub notice { my @a = @_; $send->('notice', @a); }
sub warning { my @a = @_; $send->('warning', @a); }
sub error { my @a = @_; $send->('error', @a); }

sub common_template_data {
    my $hostname = PVE::INotify::nodename();
    return { hostname => $hostname, fqdn => "$hostname.stand-in.example" };
}

1;
