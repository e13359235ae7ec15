"""The shop's worker role: ships orders, each exactly once, whatever stops it."""

import time

import orders

from rolehost import RoleEntryPoint, RoleEnvironment


class ShippingWorker(RoleEntryPoint):
    def on_start(self) -> bool:
        self.me = RoleEnvironment.current_instance.id
        self.db = orders.connect(RoleEnvironment.get_setting("orders_db"))
        orders.release(self.db, self.me)  # what a killed incarnation of this instance held
        return True

    def run(self) -> None:
        while not RoleEnvironment.is_stopping:
            order = orders.claim(self.db, self.me)
            if order is None:
                RoleEnvironment.wait_for_stop(0.05)
                continue
            time.sleep(0.005)  # packing
            orders.ship(self.db, order, self.me)

    def on_stop(self) -> None:
        db = orders.connect(RoleEnvironment.get_setting("orders_db"))  # on_stop's own thread
        orders.release(db, self.me)
        db.close()
